"""Qwen3-VL: ViT with 16 px patches and 2x2 merging, DeepStack (vision features added to the first decoder
layers), interleaved M-RoPE, ChatML turns. The family vLLM's ColQwen3 late-interaction class is built on."""

from __future__ import annotations

import torch
import transformers

from unime.backbones.qwen2_vl import qwen_spec, qwen_vision_token_ids, tiny_qwen_tokenizer

# Tiny image budget: a 128x128 image is 8x8 patches of 16 px, merged 2x2 into 16 image tokens (32 px per token
# side, where Qwen2-VL has 28).
TINY_PATCH_SIZE = 16
TINY_MIN_PIXELS = 32 * 32
TINY_MAX_PIXELS = 128 * 128


def build_tiny_qwen3_vl(
    seed: int = 0,
) -> tuple[transformers.Qwen3VLForConditionalGeneration, transformers.Qwen3VLProcessor]:
    tokenizer, ids = tiny_qwen_tokenizer()
    # deepstack_visual_indexes=[0]: the first vision block's merged features are added to the hidden states of the
    # image tokens after decoder layer 0, the path the real model takes (blocks 5, 11, 17 of 24 in the 2B one).
    # num_position_embeddings is a square (an 8x8 learned grid, bilinearly resampled to each image's patch grid).
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=TINY_PATCH_SIZE,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    # head_dim 32 (vLLM's CPU attention needs head sizes >= 32). Interleaved M-RoPE needs sum(mrope_section) ==
    # head_dim // 2, split as the real model splits its 64 frequencies ([24, 20, 20]): 16 -> [6, 5, 5].
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
            "rope_theta": 5_000_000.0,
        },
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=ids["<|endoftext|>"],
    )
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **qwen_vision_token_ids(ids))
    torch.manual_seed(seed)
    model = transformers.Qwen3VLForConditionalGeneration(config).eval()
    # The real checkpoints' image processor: Qwen2-VL's, with 16 px patches and mean = std = 0.5.
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=TINY_PATCH_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
    )
    processor = transformers.Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=transformers.Qwen3VLVideoProcessor(patch_size=TINY_PATCH_SIZE),
        chat_template=tokenizer.chat_template,
    )
    return model, processor


# Images take the same M-RoPE positions as in Qwen2-VL (a `t x h x w` grid from the image's start, the text after it
# resuming at start + max(h, w)), and the image processor is Qwen2-VL's: the shared batch-wide inputs and positions
# apply unchanged (tested equal to the processor's and the model's own). The vision blocks name their projections
# `qkv`, `proj`, `linear_fc1`, `linear_fc2`: the shared LoRA regex, pinned to the decoder, leaves them out.
QWEN3_VL = qwen_spec(
    "qwen3_vl",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLProcessor",
    build_tiny_qwen3_vl,
    ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
)

SPECS = (QWEN3_VL,)
