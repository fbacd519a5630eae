"""vLLM's own late-interaction serving (its ColQwen3 class, `token_embed` pooling and MaxSim scoring route) on a unime
Qwen3-VL multi-vector directory: the same token vectors as `unime.load(dir).encode(..., output="multi_vector")` and
the same MaxSim scores as `Embedder.maxsim`.

One real vLLM OpenAI server per module, started from `unime.vllm_compat.late_interaction_server_args`; queries and
pages are rendered by `unime.vllm_compat.EmbeddingPrompts` (vLLM encodes them as given, without a chat template).
"""

from __future__ import annotations

import importlib.util
import random

import httpx
import numpy as np
import pytest

from tests.eval.vllm_server import API_KEY, VLLMServer
from tests.serve.server_process import cosines, data_url
from tests.serve.test_multi_vector_serving import DOCUMENT_INSTRUCTION, QUERY_INSTRUCTION, save_multi_vector_model
from unime.vllm_compat import EmbeddingPrompts, late_interaction_server_args

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

QUERY, DOCUMENT = QUERY_INSTRUCTION, DOCUMENT_INSTRUCTION


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3-VL embedder with a multi-vector head (128-d token vectors) and query/document instructions."""
    return save_multi_vector_model(tmp_path_factory.mktemp("late-interaction") / "tiny-qwen3-vl", "qwen3_vl", seed=5)


@pytest.fixture(scope="module")
def local(model_dir):
    import unime

    return unime.load(model_dir)


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    server = VLLMServer(model_dir, tmp_path_factory.mktemp("vllm-late-interaction"), late_interaction_server_args)
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pages_and_queries():
    """Drawn scenes as pages (two sizes) and their captions as queries."""
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    rng = random.Random(7)
    scenes = [random_scene(rng) for _ in range(3)]
    pages = [draw_scene(scene) for scene in scenes]
    pages[1] = pages[1].resize((120, 90))
    return pages, [describe(scene) for scene in scenes]


def post(server: VLLMServer, path: str, payload: dict) -> dict:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(
        server.url + path, json={"model": str(server.model_dir), **payload}, headers=headers, timeout=120
    )
    assert response.status_code == 200, f"{response.text}\n{server.log()}"
    return response.json()


def assert_same_tokens(served: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert [len(m) for m in served] == [len(m) for m in expected]
    for index, (a, b) in enumerate(zip(served, expected, strict=True)):
        worst = cosines(a, np.asarray(b)).min()
        assert worst >= 0.9999, f"item {index}: a token's cosine is {worst}"


def test_token_vectors_of_queries_and_pages_equal_unime_encode(vllm, model_dir, local, pages_and_queries):
    pages, queries = pages_and_queries
    prompts = EmbeddingPrompts(model_dir)
    # Queries as rendered prompts on /pooling's completion form.
    rendered = [prompt["prompt"] for prompt in prompts.render(queries, QUERY)]
    body = post(vllm, "/pooling", {"input": rendered, "task": "token_embed"})
    served = [np.asarray(row["data"], dtype=np.float32) for row in body["data"]]
    assert_same_tokens(served, local.encode_query(queries, output="multi_vector"))
    # Pages through the chat form: the directory's template renders the instruction and the image as unime does.
    for page, expected in zip(pages, local.encode_document(pages, output="multi_vector"), strict=True):
        messages = [
            {"role": "system", "content": [{"type": "text", "text": DOCUMENT}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(page)}}]},
        ]
        (row,) = post(vllm, "/pooling", {"messages": messages, "task": "token_embed"})["data"]
        assert_same_tokens([np.asarray(row["data"], dtype=np.float32)], [expected])


def test_maxsim_scores_of_the_score_route_equal_unime_maxsim(vllm, model_dir, local, pages_and_queries):
    pages, queries = pages_and_queries
    prompts = EmbeddingPrompts(model_dir)
    documents = [*pages, queries[2]]  # pages and a text document
    sent = [prompts.score_input(p) for p in prompts.render(documents, DOCUMENT)]
    expected = local.maxsim(
        local.encode_query(queries[:1], output="multi_vector"), local.encode_document(documents, output="multi_vector")
    )[0].numpy()  # [4]
    (query,) = [prompts.score_input(p) for p in prompts.render(queries[:1], QUERY)]
    body = post(vllm, "/score", {"queries": query, "documents": sent})
    scores = [row["score"] for row in sorted(body["data"], key=lambda row: row["index"])]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 1e-2  # the documents score apart: the comparison can tell them apart
    # The rerank route orders them by the same scores.
    ranked = post(vllm, "/v1/rerank", {"query": query, "documents": sent})["results"]
    assert [row["index"] for row in ranked] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([row["relevance_score"] for row in ranked], np.sort(expected)[::-1], atol=1e-4)
