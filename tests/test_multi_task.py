"""One checkpoint, three heads: each head of a multi-task model equals the same computation done by a
single-purpose model, the heads share the base weights in memory, and every consumer reads its head from the one
saved directory (SentenceTransformer and MultiVectorEncoder at its root, CrossEncoder in `reranker/`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sentence_transformers import CrossEncoder, MultiVectorEncoder, SentenceTransformer

import unime
from tests.conftest import mixed_inputs
from unime.config import MultiVectorConfig
from unime.embedder import Embedder
from unime.errors import ConfigError
from unime.multi_task import RERANKER_FOLDER, MultiTaskModel, build_tiny_multi_task, from_embedder
from unime.reranker import Reranker
from unime.retrieve_rerank import retrieve_then_rerank

DIM = 24


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, MultiTaskModel]:
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("multi-task") / "three-heads"
    model = build_tiny_multi_task("qwen2_vl", seed=3, multi_vector=MultiVectorConfig(dim=DIM))
    model.set_rerank_prompt(system_prompt="Relevant?")
    model.save(directory)
    return directory, unime.load(directory)


@pytest.fixture(scope="module")
def inputs(scenes, real_photo_paths) -> list:
    images, captions = scenes
    return mixed_inputs(images, captions, [Image.open(real_photo_paths[0]).convert("RGB")])


@pytest.fixture(scope="module")
def pairs(inputs) -> list:
    return [(inputs[i], inputs[j]) for i, j in ((0, 1), (2, 3), (1, 4), (5, 0), (3, 3))]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _unique_parameter_bytes(*models) -> int:
    """Bytes of distinct parameter storage across the models (a tensor shared by two counts once)."""
    seen: dict[int, int] = {}
    for model in models:
        for parameter in model.parameters():
            seen[parameter.untyped_storage().data_ptr()] = parameter.untyped_storage().nbytes()
    return sum(seen.values())


def test_the_directory_loads_as_one_model_with_three_heads(saved) -> None:
    directory, model = saved
    assert isinstance(model, MultiTaskModel)
    assert json.loads((directory / "unime_config.json").read_text())["kind"] == "multi_task"
    assert model.config.multi_vector == MultiVectorConfig(dim=DIM)
    assert model.reranker.config.rerank.system_prompt == "Relevant?"  # the judge prompt travels
    # The reranker folder's weights are links to the root's, not a second copy.
    linked = [path for path in (directory / RERANKER_FOLDER).iterdir() if path.is_symlink()]
    assert {path.name for path in linked} >= {"config.json", "model.safetensors"}
    assert all(path.resolve().parent == directory.resolve() for path in linked)
    # The shared weights hold only the base: vLLM's yes/no scorer reads them through the links and refuses a tensor
    # it does not know, so the projection stays in its own file (no ColQwen2 copy, unlike a Qwen2-VL embedder).
    assert not any(key.startswith("custom_text_proj") for key in load_file(str(directory / "model.safetensors")))
    assert set(load_file(str(directory / "multi_vector_head.safetensors"))) == {"custom_text_proj.weight"}


def test_the_heads_share_the_base_weights_in_memory(saved) -> None:
    directory, model = saved
    embedder_ptrs = [p.data_ptr() for p in model.embedder.model.parameters()]
    reranker_ptrs = [p.data_ptr() for p in model.reranker.model.parameters()]
    assert embedder_ptrs == reranker_ptrs
    assert model.embedder.multi_vector_head is model.multi_vector_head
    # Every weight once: the multi-task model holds the base and the head, nothing more.
    head_bytes = sum(p.numel() * p.element_size() for p in model.multi_vector_head.parameters())
    base_bytes = _unique_parameter_bytes(model.embedder.model)
    assert _unique_parameter_bytes(model) == base_bytes + head_bytes
    # Three single-purpose models loaded from the same directory hold three copies of the base.
    separate = [
        unime.load(directory, kind="embedder"),
        unime.load(directory, kind="embedder"),
        unime.load(directory / RERANKER_FOLDER),
    ]
    separate[0].set_multi_vector_head(None)  # the pooled-vector model has no multi-vector head
    three = _unique_parameter_bytes(*separate)
    assert three == 3 * base_bytes + head_bytes
    assert three / _unique_parameter_bytes(model) > 2.9


def test_each_head_equals_the_single_purpose_model(saved, inputs, pairs) -> None:
    """The embedder and the reranker loaded alone from the same directory give exactly the heads' outputs."""
    directory, model = saved
    embedder = unime.load(directory, kind="embedder")
    reranker = unime.load(directory, kind="reranker")
    assert isinstance(embedder, Embedder) and isinstance(reranker, Reranker)
    np.testing.assert_array_equal(model.encode(inputs, output="dense"), embedder.encode(inputs))
    np.testing.assert_array_equal(model.encode(inputs), embedder.encode(inputs, output="single_vector"))
    for got, expected in zip(
        model.encode(inputs, output="multi_vector"), embedder.encode(inputs, output="multi_vector"), strict=True
    ):
        np.testing.assert_array_equal(got, expected)
    scores = model.predict(pairs)
    np.testing.assert_array_equal(scores, reranker.predict(pairs))
    np.testing.assert_array_equal(scores, unime.load(directory / RERANKER_FOLDER).predict(pairs))
    assert model.rank(pairs[0][0], [doc for _, doc in pairs]) == reranker.rank(pairs[0][0], [doc for _, doc in pairs])
    assert np.ptp(scores) > 1e-4  # the scores tell the pairs apart


def test_the_heads_are_unchanged_by_the_other_heads_running(inputs, pairs) -> None:
    """A head computes the same whether or not another head ran before it (the prompts live on separate
    processors: the judge template does not leak into the embedding prompts or back)."""
    model = build_tiny_multi_task("qwen2_vl", seed=4, multi_vector=MultiVectorConfig(dim=DIM))
    first_dense = model.encode(inputs)
    first_scores = model.predict(pairs)
    tokens = model.encode(inputs, output="multi_vector")
    np.testing.assert_array_equal(model.encode(inputs), first_dense)
    np.testing.assert_array_equal(model.predict(pairs), first_scores)
    assert all(np.array_equal(a, b) for a, b in zip(model.encode(inputs, output="multi_vector"), tokens, strict=True))
    assert model.embedder.processor.chat_template != model.reranker.processor.chat_template


def test_sentence_transformers_reads_each_head_from_the_directory(saved, inputs, pairs) -> None:
    directory, model = saved
    dense = SentenceTransformer(str(directory)).encode(inputs)
    assert _cosines(dense, model.encode(inputs)).min() >= 0.9999
    got = MultiVectorEncoder(str(directory)).encode(inputs, batch_size=4)
    for a, b in zip(got, model.encode(inputs, output="multi_vector"), strict=True):
        a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        assert a.shape == b.shape and _cosines(a, b).min() >= 0.9999
    cross_encoder = CrossEncoder(str(directory / RERANKER_FOLDER))
    np.testing.assert_allclose(cross_encoder.predict(pairs), model.predict(pairs), atol=1e-5)


def test_a_multi_task_model_starts_from_an_embedder_and_keeps_its_heads(tmp_path) -> None:
    embedder = unime.build_tiny("qwen2_vl", seed=5, multi_vector=MultiVectorConfig(dim=DIM))
    texts = ["a red circle on the left", "two blue squares"]
    before = embedder.encode(texts)
    model = from_embedder(embedder)
    np.testing.assert_array_equal(model.encode(texts), before)  # the answer tokens change no embedding
    assert model.predict([(texts[0], texts[1])]).shape == (1,)
    with pytest.raises(ConfigError, match="merged weights"):
        model.save(tmp_path / "adapter-only", merge_lora=False)
    # A directory of kind embedder loads as a multi-task model to train (its answer tokens added).
    embedder.save(tmp_path / "embedder")
    loaded = unime.load(tmp_path / "embedder", kind="multi_task")
    assert isinstance(loaded, MultiTaskModel) and loaded.multi_vector_head is not None
    np.testing.assert_allclose(loaded.encode(texts), before, atol=1e-6)
    assert not os.path.exists(tmp_path / "adapter-only")


def test_retrieve_then_rerank_with_the_one_model(saved, inputs) -> None:
    """Dense or multi-vector recall, then the yes/no head on each shortlist: the same as the library's
    retrieve-then-rerank over the heads' outputs, with the reranker loaded on its own."""
    directory, model = saved
    queries, documents = inputs[:2], inputs[2:]
    reranker = unime.load(directory / RERANKER_FOLDER)
    expected = retrieve_then_rerank(
        model.encode_query(queries), model.encode_document(documents), queries, documents, reranker, top_k_candidates=2
    )
    got = model.retrieve_and_rerank(queries, documents, top_k_candidates=2)
    assert [r.indices for r in got] == [r.indices for r in expected]
    np.testing.assert_allclose([r.rerank_scores for r in got], [r.rerank_scores for r in expected], atol=1e-6)

    maxsim = model.maxsim(
        model.encode_query(queries, output="multi_vector"), model.encode_document(documents, output="multi_vector")
    )  # [2, C]
    fused = model.retrieve_and_rerank(queries, documents, recall="multi_vector", top_k_candidates=3, fusion_weight=0.5)
    for query, ranked in enumerate(fused):
        assert set(ranked.indices) == set(maxsim[query].argsort(descending=True)[:3].tolist())  # MaxSim's shortlist
        pairs = [(queries[query], documents[i]) for i in ranked.indices]
        np.testing.assert_allclose(ranked.rerank_scores, reranker.predict(pairs), atol=1e-6)
        np.testing.assert_allclose(ranked.scores, np.add(ranked.retrieval_scores, 0.5 * np.array(ranked.rerank_scores)))
        assert ranked.scores == sorted(ranked.scores, reverse=True)
    with pytest.raises(ValueError, match="recall must be 'dense' or 'multi_vector'"):
        model.retrieve_and_rerank(queries, documents, recall="sparse")
