"""Qwen2-VL and Qwen2.5-VL: ViT with 2x2 patch merging, dynamic resolution, M-RoPE, ChatML turns; and what every
Qwen-VL family shares (tokenizer, turns, module paths, batch-wide inputs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import transformers

from unime.backbones.qwen2_vl_batched import batch_inputs, mrope_position_ids
from unime.backbones.spec import BackboneSpec, TurnFormat
from unime.backbones.tiny_tokenizer import train_tiny_tokenizer
from unime.config import PromptConfig
from unime.prompts import embedding_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

QWEN_TURNS = TurnFormat(
    user_start="<|im_start|>user\n",
    user_end="<|im_end|>\n",
    assistant_start="<|im_start|>assistant\n",
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
)

# Attention and MLP projections of the decoder only: the vision blocks use `qkv`/`proj`/`fc1`/`fc2` names
# in Qwen2-VL but `q_proj`-like names in neither, and the regex pins the language model anyway.
QWEN_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# Tiny image budget: a 112x112 image is 8x8 patches of 14 px, merged 2x2 into 16 image tokens.
TINY_MIN_PIXELS = 28 * 28
TINY_MAX_PIXELS = 112 * 112


def _text_config(
    vocab_size: int,
    pad_id: int,
    eos_id: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    layers: int = 2,
    heads: int = 2,
) -> dict:
    # head_dim 32 (hidden 64 / 2 heads) at least: vLLM's CPU attention needs head sizes >= 32.
    # M-RoPE splits head_dim // 2 rotary frequencies over (time, height, width) and needs sum(mrope_section) ==
    # head_dim // 2; a quarter goes to time and the rest is shared by height and width, as in the real model
    # (head_dim 128 -> [16, 24, 24]; the tiny one's 32 -> [4, 6, 6]).
    rotary = hidden_size // heads // 2
    spatial = (rotary - rotary // 4) // 2
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [rotary - 2 * spatial, spatial, spatial],
            "rope_theta": 10000.0,
        },
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
    )


def tiny_qwen_tokenizer() -> tuple[transformers.PreTrainedTokenizerFast, dict[str, int]]:
    """The tiny tokenizer of the Qwen-VL families (same special tokens and ChatML turns) and its special token ids."""
    tokenizer = train_tiny_tokenizer(
        QWEN_SPECIAL_TOKENS,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=embedding_chat_template(QWEN_TURNS, PromptConfig()),
    )
    return tokenizer, {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}


def qwen_vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    """The config's image, video and vision start/end token ids, from the tokenizer's special token ids."""
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _build_tiny(
    seed: int, *, config_class: str, model_class: str, processor_class: str, vision: dict, text: dict | None = None
):
    tokenizer, ids = tiny_qwen_tokenizer()
    config = getattr(transformers, config_class)(
        text_config=_text_config(len(tokenizer), ids["<|endoftext|>"], ids["<|im_end|>"], **(text or {})),
        vision_config=vision,
        **qwen_vision_token_ids(ids),
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    image_processor = transformers.Qwen2VLImageProcessor(
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS}
    )
    processor = getattr(transformers, processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


def build_tiny_qwen2_vl(seed: int = 0):
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return _build_tiny(
        seed,
        config_class="Qwen2VLConfig",
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        vision=vision,
    )


def build_small_qwen2_vl(seed: int = 0):
    """Qwen2-VL wide and deep enough that the forward pass, not Python, dominates (about 16 M parameters).

    The tiny model's forward pass is mostly framework overhead; benchmarks that should behave like a real model
    (compute-bound: time grows with tokens) use this one. Same tokenizer, processor and image budget.
    """
    vision = dict(
        depth=4,
        embed_dim=128,
        hidden_size=384,
        num_heads=2,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return _build_tiny(
        seed,
        config_class="Qwen2VLConfig",
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        vision=vision,
        text=dict(hidden_size=384, intermediate_size=1536, layers=6, heads=6),
    )


def build_tiny_qwen2_5_vl(seed: int = 0):
    # fullatt_block_indexes: block 1 attends globally, block 0 inside windows, as the real model alternates.
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
    )
    return _build_tiny(
        seed,
        config_class="Qwen2_5_VLConfig",
        model_class="Qwen2_5_VLForConditionalGeneration",
        processor_class="Qwen2_5_VLProcessor",
        vision=vision,
    )


def qwen_spec(
    name: str,
    model_class: str,
    processor_class: str,
    build_tiny: Callable[[int], tuple[PreTrainedModel, ProcessorMixin]],
    example_checkpoints: tuple[str, ...],
    build_small: Callable[[int], tuple[PreTrainedModel, ProcessorMixin]] | None = None,
) -> BackboneSpec:
    """A Qwen-VL family's entry: ChatML turns, the `<|image_pad|>` token, `model.visual` / `model.language_model`
    paths and the batch-wide inputs and M-RoPE positions are shared; the classes and builders differ."""
    return BackboneSpec(
        name=name,
        model_types=(name,),
        model_class=model_class,
        processor_class=processor_class,
        image_token="<|image_pad|>",
        turn_format=QWEN_TURNS,
        lora_target_modules=QWEN_LORA_TARGETS,
        vision_tower="model.visual",
        projector="model.visual.merger",
        language_model="model.language_model",
        build_tiny=build_tiny,
        build_small=build_small,
        example_checkpoints=example_checkpoints,
        batch_inputs=batch_inputs,
        position_ids=mrope_position_ids,
    )


QWEN2_VL = qwen_spec(
    "qwen2_vl",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLProcessor",
    build_tiny_qwen2_vl,
    ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"),
    build_small=build_small_qwen2_vl,
)

QWEN2_5_VL = qwen_spec(
    "qwen2_5_vl",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLProcessor",
    build_tiny_qwen2_5_vl,
    ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"),
)

SPECS = (QWEN2_VL, QWEN2_5_VL)
