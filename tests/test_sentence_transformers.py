"""A saved model directory loads in sentence-transformers (its own modules) and gives unime's vectors."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

import unime


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def pair(request, tmp_path_factory):
    if request.param == "qwen2_vl":
        directory = request.getfixturevalue("tiny_dir")
    else:  # the same query instruction as `tiny_dir`'s, on a fresh Qwen3-VL
        embedder = unime.build_tiny(request.param, seed=0)
        embedder.config.prompts.query_instruction = "Find the image that matches the caption."
        directory = tmp_path_factory.mktemp("models") / "tiny-qwen3-vl"
        embedder.save(directory)
    return unime.load(directory), SentenceTransformer(str(directory))


@pytest.fixture(scope="module")
def inputs(scenes, real_photo_paths):
    from PIL import Image

    images, captions = scenes
    # A real photo as a PIL image: sentence-transformers would decode a path string with torchvision's
    # decoder, whose compiled extension does not load beside the CPU torch of this stack.
    return [
        captions[0],
        images[0],
        Image.open(real_photo_paths[0]).convert("RGB"),
        {"text": captions[1], "image": images[1].resize((90, 70))},
        "a longer caption about shapes " * 4,
        images[2],
    ]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_sentence_transformers_gives_the_same_vectors(pair, inputs) -> None:
    ours, st = pair
    expected = ours.encode(inputs)
    got = st.encode(inputs, batch_size=4)
    assert got.shape == expected.shape
    assert _cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # its Normalize module is there


def test_query_and_document_prompts_travel_to_sentence_transformers(pair, inputs) -> None:
    ours, st = pair
    assert st.prompts["query"] == ours.config.prompts.query_instruction != ""
    queries = ours.encode_query(inputs)
    assert np.abs(queries - ours.encode(inputs)).max() > 1e-3  # the instruction matters
    assert _cosines(st.encode_query(inputs), queries).min() >= 0.9999
    assert _cosines(st.encode_document(inputs), ours.encode_document(inputs)).min() >= 0.9999


def test_sentence_transformers_similarity_and_dimension(pair, inputs) -> None:
    ours, st = pair
    assert st.get_embedding_dimension() == ours.embedding_dim
    a, b = st.encode(inputs[:2]), st.encode(inputs[2:])
    np.testing.assert_allclose(st.similarity(a, b).numpy(), ours.similarity(a, b).numpy(), atol=1e-6)
