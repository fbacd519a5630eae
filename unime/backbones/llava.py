"""LLaVA-1.5 (llava-hf): CLIP ViT, two-layer MLP projector, Llama/Vicuna decoder, `USER: ... ASSISTANT:` turns."""

from __future__ import annotations

import torch
import transformers

from unime.backbones.spec import BackboneSpec, TurnFormat
from unime.backbones.tiny_tokenizer import train_tiny_tokenizer
from unime.config import PromptConfig
from unime.prompts import embedding_chat_template

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# llava-hf's template renders `USER: <image>\n<text> ASSISTANT:`. The BOS is written by the template rather than
# left to the tokenizer: the processor's apply_chat_template then turns the tokenizer's own BOS off, and
# consumers that tokenize a rendered chat without special tokens (vLLM) still get exactly one.
LLAVA_TURNS = TurnFormat(
    user_start="USER: ",
    user_end=" ",
    assistant_start="ASSISTANT:",
    image_placeholder="<image>\n",
    bos="<s>",
)

# Decoder projections only: CLIP's attention also has `q_proj`/`k_proj`/`v_proj`, so the regex pins the
# language model.
LLAVA_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# Tiny image budget: 56x56 is 4x4 patches of 14 px; CLIP adds a CLS that the "default" strategy drops again.
TINY_IMAGE_SIZE = 56
TINY_PATCH_SIZE = 14
TINY_IMAGE_TOKENS = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2


def build_tiny_llava(seed: int = 0) -> tuple[transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor]:
    tokenizer = train_tiny_tokenizer(
        LLAVA_SPECIAL_TOKENS,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        chat_template=embedding_chat_template(LLAVA_TURNS, PromptConfig()),
    )
    # Like the real Llama tokenizer, add a BOS on plain calls, so the tiny model exercises the same dedup.
    tokenizer.add_bos_token = True
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in LLAVA_SPECIAL_TOKENS}
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
    )
    # head_dim 32 (hidden 64 / 2 heads): vLLM's CPU attention needs head sizes >= 32.
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<image>"],
        image_seq_length=TINY_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    # num_additional_image_tokens=1 counts CLIP's CLS, which "default" then drops: 16 tokens, as the model emits.
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return model, processor


LLAVA = BackboneSpec(
    name="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    processor_class="LlavaProcessor",
    image_token="<image>",
    turn_format=LLAVA_TURNS,
    lora_target_modules=LLAVA_LORA_TARGETS,
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",
    language_model="model.language_model",
    build_tiny=build_tiny_llava,
    example_checkpoints=("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-13b-hf"),
)

SPECS = (LLAVA,)
