"""Batch-wide Qwen2-VL inputs (`unime.backbones.qwen2_vl_batched`) equal what the processor and the model compute.

The processor resizes and patches images one by one and the model lays out M-RoPE positions sequence by
sequence; the batched versions must give the same tensors, bit for bit, or the vectors would drift from what
sentence-transformers and vLLM compute from the same directory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import unime
from unime.backbones.qwen2_vl_batched import batch_inputs, mrope_position_ids
from unime.inputs import Input

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Sizes around and beyond the tiny processor's budget (28x28 .. 112x112 pixels): tiny, thin, square, odd, large.
SIZES = [(12, 40), (28, 28), (30, 97), (64, 64), (111, 57), (160, 120), (300, 41), (57, 300)]


def noise_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return image.convert(mode).convert("RGB") if mode != "RGB" else image


def mixed_items(seed: int) -> list[Input]:
    rng = np.random.default_rng(seed)
    items = []
    for index, (width, height) in enumerate(SIZES):
        image = noise_image(rng, width, height, mode="L" if index % 4 == 3 else "RGB")
        words = " ".join(f"w{int(w)}" for w in rng.integers(0, 50, size=int(rng.integers(1, 30))))
        items += [Input(text=words), Input(image=image), Input(text=words[:20], image=image)]
    return items


def reference(model):
    """The same model with the batch-wide hooks off: the processor's and the model's own per-item code."""
    plain = dataclasses.replace(model.spec, batch_inputs=None, position_ids=None)
    copy = type(model).__new__(type(model))
    copy.__dict__.update(model.__dict__)
    copy.spec = plain
    return copy


def assert_same_features(fast: dict, slow: dict) -> None:
    assert sorted(fast) == sorted(slow)
    for key in slow:
        assert fast[key].dtype == slow[key].dtype, key
        assert torch.equal(fast[key], slow[key]), f"{key}: max difference {(fast[key] - slow[key]).abs().max()}"


@pytest.fixture(scope="module", params=FAMILIES)
def embedder(request):
    return unime.build_tiny(request.param)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_features_equal_the_processor(embedder, padding_side):
    embedder.processor.tokenizer.padding_side = padding_side
    try:
        items = mixed_items(0)
        fast = embedder.tokenize(items, ["Find the caption."] * 5 + [None] * (len(items) - 5))
        slow = reference(embedder).tokenize(items, ["Find the caption."] * 5 + [None] * (len(items) - 5))
        assert "pixel_values" in slow and "mm_token_type_ids" in slow
        assert_same_features(fast, slow)
        texts = [item for item in items if not item.has_image]
        assert_same_features(embedder.tokenize(texts), reference(embedder).tokenize(texts))
    finally:
        embedder.processor.tokenizer.padding_side = "right"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_position_ids_equal_the_models_rope_index(embedder, padding_side):
    embedder.processor.tokenizer.padding_side = padding_side
    try:
        features = reference(embedder).tokenize(mixed_items(1))
    finally:
        embedder.processor.tokenizer.padding_side = "right"
    base = embedder.hf_model.model
    expected, _ = base.get_rope_index(
        features["input_ids"],
        features["mm_token_type_ids"],
        image_grid_thw=features["image_grid_thw"],
        attention_mask=features["attention_mask"],
    )
    positions = mrope_position_ids(embedder.hf_model.config, features)
    assert positions.shape == expected.shape  # [3, batch, seq]
    assert torch.equal(positions, expected)
    # Images make the three axes differ (a text-only layout would not test anything).
    assert not torch.equal(positions[1], positions[2])


def test_embeddings_and_reranker_logits_equal_the_per_item_path(embedder):
    items = mixed_items(2)
    inputs = [{key: value for key, value in (("text", i.text), ("image", i.image)) if value is not None} for i in items]
    with torch.inference_mode():
        fast = embedder.encode(inputs, batch_size=9, convert_to_tensor=True)
        slow = reference(embedder).encode(inputs, batch_size=9, convert_to_tensor=True)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)

    reranker = unime.build_tiny(embedder.config.backbone, kind="reranker")
    query, document = items[2], items[5]  # text+image query, text+image document: two images in one prompt
    pairs = [(query, document), (items[0], items[1]), (items[1], items[3]), (items[3], items[4])]
    assert_same_features(reranker.tokenize(pairs), reference(reranker).tokenize(pairs))
    with torch.inference_mode():
        torch.testing.assert_close(
            reranker(reranker.tokenize(pairs)),
            reference(reranker)(reference(reranker).tokenize(pairs)),
            atol=1e-6,
            rtol=0,
        )


@pytest.mark.parametrize(
    "setting", [{"do_normalize": False}, {"resample": 2}, {"do_resize": False}], ids=lambda s: next(iter(s))
)
def test_other_image_processor_settings_fall_back_to_the_processor(setting):
    embedder = unime.build_tiny("qwen2_vl")
    for key, value in setting.items():
        setattr(embedder.processor.image_processor, key, value)
    image = noise_image(np.random.default_rng(3), 56, 56)
    prompt = embedder._renderer.render(Input(image=image), None)
    kwargs = {"padding": True, "return_tensors": "pt"}
    assert batch_inputs(embedder.processor, [prompt], [[image]], kwargs) is None
    # The embedder still gives the processor's features.
    assert_same_features(embedder.tokenize([Input(image=image)]), reference(embedder).tokenize([Input(image=image)]))


def test_a_prompt_with_fewer_placeholders_than_images_is_refused():
    embedder = unime.build_tiny("qwen2_vl")
    image = noise_image(np.random.default_rng(4), 56, 56)
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        batch_inputs(
            embedder.processor,
            [embedder._renderer.render(Input(image=image), None)],
            [[image, image]],
            {"padding": True, "return_tensors": "pt"},
        )
