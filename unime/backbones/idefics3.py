"""Idefics3 and SmolVLM: SigLIP-style encoder, pixel-shuffle connector, Llama decoder, `User:`/`Assistant:` turns."""

from __future__ import annotations

import torch
import transformers

from unime.backbones.spec import BackboneSpec, TurnFormat
from unime.backbones.tiny_tokenizer import train_tiny_tokenizer
from unime.config import PromptConfig
from unime.prompts import embedding_chat_template

# The processor expands each `<image>` into `<fake_token_around_image><global-img><image>*N<fake_token_around_image>`.
# Without image splitting it never emits the `<row_i_col_j>` tags, so the tiny tokenizer leaves them out.
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]


def _turns(bos: str) -> TurnFormat:
    # Both families render `BOS User:<image>text<end_of_utterance>\nAssistant:`. The BOS is written by the
    # template: the processor's apply_chat_template then tokenizes without special tokens, so a tokenizer that
    # adds BOS itself (Idefics3's Llama 3) still yields exactly one, in unime's path and sentence-transformers'.
    return TurnFormat(
        user_start="User:",
        user_end="<end_of_utterance>\n",
        assistant_start="Assistant:",
        image_placeholder="<image>",
        bos=bos,
    )


IDEFICS3_TURNS = _turns("<|begin_of_text|>")
SMOLVLM_TURNS = _turns("<|im_start|>")  # SmolLM2's BOS opens the conversation once, not every turn

# The vision encoder names its projections q_proj/k_proj/v_proj too, so the regex pins the text model.
LORA_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# A 64x64 image (squared, no splitting) is 8x8 patches of 8 px; pixel shuffle by 2 leaves 16 image tokens.
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
TINY_SCALE_FACTOR = 2
TINY_IMAGE_SEQ_LEN = (TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2 // TINY_SCALE_FACTOR**2


def _build_tiny(seed: int, *, family: str, turns: TurnFormat, eos: str, pad: str, needs_video_processor: bool):
    tokenizer = train_tiny_tokenizer(
        list(dict.fromkeys([turns.bos, eos, pad, *IMAGE_TOKENS])),
        bos_token=turns.bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=embedding_chat_template(turns, PromptConfig()),
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (turns.bos, eos, pad, "<image>")}
    # head_dim 32 (hidden 64 / 2 heads): vLLM's CPU attention needs head sizes >= 32.
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=ids[pad],
        bos_token_id=ids[turns.bos],
        eos_token_id=ids[eos],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
    )
    config = getattr(transformers, f"{family}Config")(
        text_config=text,
        vision_config=vision,
        scale_factor=TINY_SCALE_FACTOR,
        image_token_id=ids["<image>"],
        pad_token_id=ids[pad],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForConditionalGeneration")(config).eval()
    # Splitting off: every image is squared to the encoder's size, so it always costs TINY_IMAGE_SEQ_LEN tokens.
    sizes = dict(
        do_image_splitting=False,
        size={"longest_edge": TINY_IMAGE_SIZE},
        max_image_size={"longest_edge": TINY_IMAGE_SIZE},
    )
    extra = {}
    if needs_video_processor:  # SmolVLM's processor insists on one even for images
        extra["video_processor"] = transformers.SmolVLMVideoProcessor(**sizes)
    processor = getattr(transformers, f"{family}Processor")(
        image_processor=getattr(transformers, f"{family}ImageProcessor")(**sizes),
        tokenizer=tokenizer,
        image_seq_len=TINY_IMAGE_SEQ_LEN,
        chat_template=tokenizer.chat_template,
        **extra,
    )
    return model, processor


def build_tiny_idefics3(seed: int = 0):
    return _build_tiny(
        seed,
        family="Idefics3",
        turns=IDEFICS3_TURNS,
        eos="<|end_of_text|>",
        pad="<|end_of_text|>",
        needs_video_processor=False,
    )


def build_tiny_smolvlm(seed: int = 0):
    return _build_tiny(
        seed,
        family="SmolVLM",
        turns=SMOLVLM_TURNS,
        eos="<end_of_utterance>",
        pad="<|im_end|>",
        needs_video_processor=True,
    )


IDEFICS3 = BackboneSpec(
    name="idefics3",
    model_types=("idefics3",),
    model_class="Idefics3ForConditionalGeneration",
    processor_class="Idefics3Processor",
    image_token="<image>",
    turn_format=IDEFICS3_TURNS,
    lora_target_modules=LORA_TARGETS,
    vision_tower="model.vision_model",
    projector="model.connector",
    language_model="model.text_model",
    build_tiny=build_tiny_idefics3,
    example_checkpoints=("HuggingFaceM4/Idefics3-8B-Llama3",),
)

SMOLVLM = BackboneSpec(
    name="smolvlm",
    model_types=("smolvlm",),
    model_class="SmolVLMForConditionalGeneration",
    processor_class="SmolVLMProcessor",
    image_token="<image>",
    turn_format=SMOLVLM_TURNS,
    lora_target_modules=LORA_TARGETS,
    vision_tower="model.vision_model",
    projector="model.connector",
    language_model="model.text_model",
    build_tiny=build_tiny_smolvlm,
    example_checkpoints=("HuggingFaceTB/SmolVLM-Instruct", "HuggingFaceTB/SmolVLM-256M-Instruct"),
)

SPECS = (IDEFICS3, SMOLVLM)
