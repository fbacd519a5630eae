"""The encode API: order, batch-size invariance, options, and equivalence with a hand-made forward pass."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unime
from tests.conftest import mixed_inputs
from unime.inputs import parse_input


# Qwen2-VL, and Qwen3-VL for its own image processor, DeepStack and interleaved M-RoPE behind the same template.
@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def embedder(request, tiny_embedders):
    return tiny_embedders(request.param)


@pytest.fixture(scope="module")
def inputs(scenes, real_photo_paths):
    images, captions = scenes
    return mixed_inputs(images, captions, real_photo_paths)


def test_encode_equals_a_hand_made_forward_of_the_rendered_prompt(embedder, scenes) -> None:
    images, captions = scenes
    expected_prompt = (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "Summarize above image in one word:<|im_end|>\n<|im_start|>assistant\n"
    )
    features = embedder.processor(text=[expected_prompt], images=[images[0]], return_tensors="pt")
    with torch.no_grad():
        hidden = embedder.model.model(**features).last_hidden_state  # [1, T, D]
    by_hand = F.normalize(hidden[:, -1], dim=-1)[0].numpy()
    np.testing.assert_allclose(embedder.encode(images[0]), by_hand, atol=1e-6)


def test_prompts_follow_the_unime_template(embedder, scenes) -> None:
    images, _ = scenes
    render = embedder.processor.apply_chat_template
    text_only = render([{"role": "user", "content": [{"type": "text", "text": "a red circle"}]}], tokenize=False)
    assert text_only == (
        "<|im_start|>user\na red circle\nSummarize above sentence in one word:<|im_end|>\n<|im_start|>assistant\n"
    )
    both = render(
        [
            {"role": "system", "content": [{"type": "text", "text": "Find it."}]},
            # text before image: the template puts the image first whatever the order
            {"role": "user", "content": [{"type": "text", "text": "left?"}, {"type": "image", "image": images[0]}]},
        ],
        tokenize=False,
    )
    assert both == (
        "<|im_start|>user\nFind it.\n<|vision_start|><|image_pad|><|vision_end|>left?\n"
        "Summarize above image and sentence in one word:<|im_end|>\n<|im_start|>assistant\n"
    )


def test_output_follows_input_order_and_batch_size_does_not_matter(embedder, inputs) -> None:
    together = embedder.encode(inputs, batch_size=4)
    assert together.shape == (len(inputs), embedder.embedding_dim)
    alone = np.stack([embedder.encode(item) for item in inputs])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(embedder.encode(inputs, batch_size=1), together, atol=1e-5)
    np.testing.assert_allclose(embedder.encode(inputs[::-1], batch_size=3), together[::-1], atol=1e-5)
    # Different inputs give different vectors (the test would pass trivially on a constant model).
    assert np.abs(together[0] - together[1]).max() > 1e-3


def test_encode_options(embedder, inputs) -> None:
    normalized = embedder.encode(inputs)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-5)
    raw = embedder.encode(inputs, normalize_embeddings=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), normalized, atol=1e-5)

    truncated = embedder.encode(inputs, truncate_dim=16)
    expected = raw[:, :16] / np.linalg.norm(raw[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(truncated, expected, atol=1e-5)

    as_tensor = embedder.encode(inputs[:2], convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.shape == (2, embedder.embedding_dim)
    assert embedder.encode("one text").shape == (embedder.embedding_dim,)
    with pytest.raises(ValueError, match="truncate_dim"):
        embedder.encode("x", truncate_dim=1000)


def test_instructions_change_queries_and_explicit_prompt_wins(tiny_dir, scenes) -> None:
    model = unime.load(tiny_dir)
    _, captions = scenes
    plain = model.encode(captions[:2])
    query = model.encode_query(captions[:2])
    assert np.abs(plain - query).max() > 1e-3
    np.testing.assert_allclose(
        model.encode(captions[:2], prompt=model.config.prompts.query_instruction), query, atol=1e-6
    )
    # No document instruction is configured: encode_document is plain encode.
    np.testing.assert_allclose(model.encode_document(captions[:2]), plain, atol=1e-6)
    np.testing.assert_allclose(
        model.encode_query(captions[:2], prompt="Other."), model.encode(captions[:2], prompt="Other.")
    )


def test_set_prompts_changes_instructions_and_summary_lines(tiny_dir, scenes) -> None:
    model = unime.load(tiny_dir)
    images, captions = scenes
    before_text, before_image = model.encode(captions[0]), model.encode(images[0])
    model.set_prompts(text_summary="Compress this sentence into one word:", document_instruction="Doc.")
    assert "Compress this sentence" in model.processor.chat_template
    assert np.abs(model.encode(captions[0]) - before_text).max() > 1e-3
    np.testing.assert_allclose(model.encode(images[0]), before_image, atol=1e-6)  # image prompts unchanged
    np.testing.assert_allclose(model.encode_document(captions[0]), model.encode(captions[0], prompt="Doc."))
    with pytest.raises(TypeError):
        model.set_prompts(summary="x")


def test_similarity_is_cosine(embedder, scenes) -> None:
    images, captions = scenes
    a = embedder.encode(captions[:3], normalize_embeddings=False)
    b = embedder.encode(images[:2], normalize_embeddings=False)
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    np.testing.assert_allclose(embedder.similarity(a, b).numpy(), expected, atol=1e-5)


def test_image_paths_strings_data_uris_and_pil_agree(embedder, real_photo_paths) -> None:
    from PIL import Image

    photo = real_photo_paths[0]
    pil = Image.open(photo).convert("RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    vectors = embedder.encode([photo, str(photo), {"image": str(photo)}, pil, uri])
    for row in vectors[1:]:
        np.testing.assert_allclose(row, vectors[0], atol=1e-5)
    # A real photo is not embedded like a blank image.
    assert np.abs(vectors[0] - embedder.encode(Image.new("RGB", (250, 250)))).max() > 1e-3


def _error(embedder, inputs, **kwargs) -> str:
    with pytest.raises(unime.InvalidInputError) as info:
        embedder.encode(inputs, **kwargs)
    return str(info.value)


def test_bad_inputs_name_their_index_and_what_was_expected(embedder, tmp_path: Path, real_photo_paths) -> None:
    missing = tmp_path / "missing.png"
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(real_photo_paths[0].read_bytes()[:2000])  # a valid header, most pixels gone
    ok = "fine text"
    cases = [
        ([ok, missing], "input 1: image file .*missing.png.* does not exist"),
        ([ok, ok, str(missing)], "input 2: .*looks like an image file path but no such file exists"),
        ([corrupt], "input 0: image file .*corrupt.jpg.* is not a readable image"),
        ([ok, {"image": truncated}], "input 1: image file .*truncated.jpg.* cannot be decoded"),
        ([ok, ""], "input 1: empty text"),
        (["   "], "input 0: empty text"),
        ([ok, 42], "input 1: expected a text .*got int"),
        ([None], "input 0: expected a text .*got NoneType"),
        ([{"text": "a", "caption": "b"}], r"input 0: unknown key\(s\) \['caption'\]"),
        ([{}], "input 0: dict input has neither 'text' nor 'image'"),
        ([{"text": 3}], "input 0: 'text' must be a str, got int"),
        ([{"image": 3.5}], "input 0: 'image' must be a PIL image or a file path, got float"),
        (["data:image/png;base64,!!!"], "input 0: image data URI cannot be decoded"),
    ]
    for inputs, pattern in cases:
        message = _error(embedder, inputs)
        assert __import__("re").search(pattern, message), (pattern, message)
    assert "expected a list" in _error(embedder, 42)
    assert "unknown prompt_name 'passage'" in _error(embedder, [ok], prompt_name="passage")


def test_a_text_that_merely_mentions_a_file_stays_text() -> None:
    assert parse_input(0, "see photo.jpg for details").text == "see photo.jpg for details"
    assert parse_input(0, {"text": "cat.jpg"}).text == "cat.jpg"


def test_attention_leaves_cudnn_out_in_forward_and_in_checkpointed_recomputation(scenes) -> None:
    """cuDNN attention rebuilds a plan for every new batch shape on GPUs: the forward pass, and the recomputation
    that gradient checkpointing runs in backward (outside the forward's context), both leave it out."""
    from unime.train.config import LoraSettings, ModelSettings
    from unime.train.trainable import make_trainable

    images, captions = scenes
    embedder = unime.build_tiny("qwen2_vl", seed=0)
    make_trainable(embedder, ModelSettings(lora=LoraSettings(enabled=False), gradient_checkpointing=True))
    embedder.train()
    seen: list[bool] = []  # whether cuDNN attention is enabled, at each call of the first decoder layer
    layer = embedder.hf_model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        features = embedder.tokenize([parse_input(0, captions[0]), parse_input(1, images[0])])
        embedder(features).sum().backward()
    finally:
        handle.remove()
    # Called in the forward and once more in backward's recomputation, cuDNN off both times.
    assert seen == [False, False]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored once the pass is over
