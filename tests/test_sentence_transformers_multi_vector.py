"""A saved multi-vector directory loads in sentence-transformers' MultiVectorEncoder (its own modules) and gives
unime's token vectors and MaxSim scores; `SentenceTransformer(dir)` on the same directory keeps the pooled vector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sentence_transformers import MultiVectorEncoder, SentenceTransformer

import unime
from tests.conftest import mixed_inputs
from unime.config import MultiVectorConfig
from unime.inputs import parse_inputs

DIM = 24
INSTRUCTION = "Find the image that matches the caption."


def _save(tmp_path_factory, backbone: str, tokens: str = "all") -> Path:
    embedder = unime.build_tiny(backbone, seed=0, multi_vector=MultiVectorConfig(dim=DIM, tokens=tokens))
    embedder.set_prompts(query_instruction=INSTRUCTION)
    directory = tmp_path_factory.mktemp("multi_vector_st") / f"tiny-{backbone}-{tokens}"
    embedder.save(directory)
    return directory


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def saved(request, tmp_path_factory):
    directory = _save(tmp_path_factory, request.param)
    return directory, unime.load(directory), MultiVectorEncoder(str(directory))


@pytest.fixture(scope="module")
def inputs(scenes, real_photo_paths) -> list:
    images, captions = scenes
    # A real photo as a PIL image: sentence-transformers would decode a path string with torchvision's
    # decoder, whose compiled extension does not load beside the CPU torch of this stack.
    return mixed_inputs(images, captions, [Image.open(real_photo_paths[0]).convert("RGB")])


def _numpy(matrices) -> list[np.ndarray]:
    return [m.numpy() if isinstance(m, torch.Tensor) else np.asarray(m) for m in matrices]


def _assert_same_token_vectors(got, expected) -> None:
    got = _numpy(got)
    assert len(got) == len(expected)
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.shape == b.shape, (index, a.shape, b.shape)  # the same tokens kept
        cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosines.min() >= 0.9999, (index, cosines.min())


def test_multi_vector_encoder_gives_the_same_token_vectors(saved, inputs) -> None:
    _, ours, st = saved
    expected = ours.encode(inputs, output="multi_vector")
    got = st.encode(inputs, batch_size=4)
    _assert_same_token_vectors(got, expected)
    assert st.get_embedding_dimension() == DIM
    for matrix in _numpy(got):
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    # Not the same vector everywhere (a constant projection would pass the checks above).
    first = _numpy(got)[0]
    assert (first @ first.T).min() < 0.99


def test_multi_vector_encoder_gives_the_same_maxsim_scores(saved, inputs) -> None:
    _, ours, st = saved
    assert st.similarity_fn_name == "maxsim"
    queries, documents = inputs[::2], inputs[1::2]
    expected = ours.maxsim(
        ours.encode_query(queries, output="multi_vector"), ours.encode_document(documents, output="multi_vector")
    )  # [4, 4]
    got = st.similarity(st.encode_query(queries), st.encode_document(documents))  # [4, 4]
    assert got.shape == expected.shape == (4, 4)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-4)
    assert expected.std() > 0.1  # the scores tell the pairs apart, so equality is not a constant


def test_query_and_document_prompts_travel_to_multi_vector_encoder(saved, inputs) -> None:
    _, ours, st = saved
    assert st.prompts["query"] == ours.config.prompts.query_instruction == INSTRUCTION
    queries = ours.encode_query(inputs, output="multi_vector")
    plain = ours.encode(inputs, output="multi_vector")
    assert all(len(q) > len(p) for q, p in zip(queries, plain, strict=True))  # the instruction's tokens are in
    _assert_same_token_vectors(st.encode_query(inputs), queries)
    _assert_same_token_vectors(st.encode_document(inputs), ours.encode_document(inputs, output="multi_vector"))


def test_sentence_transformer_on_a_multi_vector_directory_keeps_the_pooled_vector(saved, inputs) -> None:
    directory, ours, _ = saved
    st = SentenceTransformer(str(directory))
    assert st.get_embedding_dimension() == ours.embedding_dim != DIM
    got, expected = st.encode(inputs), ours.encode(inputs)
    cosines = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosines.min() >= 0.9999


def test_a_single_vector_directory_gets_no_multi_vector_module(tiny_dir) -> None:
    modules = json.loads((tiny_dir / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert not any("multi_vector" in m["type"] or m["type"].endswith("Dense") for m in modules)


def test_image_tokens_mode_matches_for_image_documents_and_text_queries(tmp_path_factory, scenes) -> None:
    directory = _save(tmp_path_factory, "qwen2_vl", tokens="image")
    ours, st = unime.load(directory), MultiVectorEncoder(str(directory))
    images, captions = scenes
    documents = [images[0], {"text": captions[1], "image": images[1]}, images[2].resize((90, 70))]
    queries = captions[:3]
    expected_documents = ours.encode_document(documents, output="multi_vector")
    image_token_id = ours.processor.tokenizer.convert_tokens_to_ids(ours.spec.image_token)
    for record, matrix in zip(documents, expected_documents, strict=True):
        features = ours.tokenize(parse_inputs([record]), ours.config.prompts.document_instruction or None)
        assert len(matrix) == int((features["input_ids"] == image_token_id).sum())  # only the image patches
        assert len(matrix) < int(features["attention_mask"].sum())
    _assert_same_token_vectors(st.encode_document(documents), expected_documents)
    expected_queries = ours.encode_query(queries, output="multi_vector")
    _assert_same_token_vectors(st.encode_query(queries), expected_queries)
    np.testing.assert_allclose(
        st.similarity(st.encode_query(queries), st.encode_document(documents)).numpy(),
        ours.maxsim(expected_queries, expected_documents).numpy(),
        rtol=1e-5,
        atol=1e-4,
    )
