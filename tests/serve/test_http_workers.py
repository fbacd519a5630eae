"""`unime serve --http-workers 2`: two HTTP processes in front of one model process, tested as the real thing.

The same answers as one process (vectors and scores equal `unime.load`, bad input named by field and index,
auth on every route), requests spread over both workers and merged into the model process's batches, metrics
of the whole server from either worker, a full queue's 503 coming back from the model process, SIGTERM under
load, and a worker's death stopping the server.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.serve.server_process import (
    assert_full_queue_answers_503,
    assert_graceful_stop_under_load,
    cosines,
    data_url,
    embed,
    metric_value,
    model_args,
    start_server,
)
from tests.serve.test_transformers_server import (
    BAD_EMBEDDINGS,
    BAD_RERANKS,
    MAX_BODY,
    MAX_PIXELS,
    MAX_TEXT,
    ROUTES,
)
from unime.errors import InvalidInputError
from unime.serve.errors import QueueFullError, RequestError
from unime.serve.workers import ModelProcessError, error_fields, error_from_fields

WORKERS = 2
MAX_QUEUE = 4
MAX_QUEUE_WAIT_S = 0.02
"""Short: requests sliced by --max-batch-items interleave, so none waits long in this module's queue."""
ITEMS = 32
"""Most items per request here (not test_transformers_server's 8): requests of 32 image+text items take long
enough to be in flight when SIGTERM lands."""

BAD_INPUTS = [("/v1/embeddings", *bad) for bad in BAD_EMBEDDINGS if bad[0] != "too many items"]
BAD_INPUTS += [("/v1/rerank", *bad) for bad in BAD_RERANKS if bad[0] != "too many documents"]
BAD_INPUTS += [
    ("/v1/embeddings", "too many items", {"input": ["a"] * (ITEMS + 1)}, 413, "input", None),
    ("/v1/rerank", "too many documents", {"query": "a", "documents": ["b"] * (ITEMS + 1)}, 413, "documents", None),
]


def server_args(serve_models) -> list[str]:
    """The module's server: two workers, the limits of test_transformers_server and a small queue."""
    return [
        *model_args(serve_models),
        "--http-workers",
        str(WORKERS),
        # The limits of test_transformers_server, whose bad inputs are sent again here (but for the item count).
        *("--max-items", str(ITEMS), "--max-body-bytes", str(MAX_BODY), "--max-text-chars", str(MAX_TEXT)),
        *("--max-image-pixels", str(MAX_PIXELS), "--max-queue", str(MAX_QUEUE)),
        # Each 8-item request fills a batch: a queue of 4 fills under 32 of them, as without batching.
        *("--max-batch-items", "8", "--batch-wait-ms", "20"),
        # Readiness: a request queued behind a few heavy ones waits longer than this.
        *("--max-queue-wait-s", str(MAX_QUEUE_WAIT_S)),
    ]


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    proc = start_server(
        server_args(serve_models), tmp_path_factory.mktemp("serve-logs") / "http-workers.log", timeout=180
    )
    yield proc
    proc.stop()


def _worker_pids(server, connections: int = 24) -> set[int]:
    """The pids answering /health over `connections` concurrent fresh connections."""

    def one(_: int) -> int:
        return httpx.get(f"{server.url}/health", headers=server.headers, timeout=60).json()["pid"]

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(connections)))


def test_requests_spread_over_both_workers(server):
    pids: set[int] = set()
    for _ in range(10):  # the second worker may still be starting; the kernel picks a worker per connection
        pids |= _worker_pids(server)
        if len(pids) == WORKERS:
            break
    assert len(pids) == WORKERS, pids
    assert server.process.pid not in pids  # the main process hosts the models, not HTTP
    health = httpx.get(f"{server.url}/health", headers=server.headers).json()
    assert health["http_workers"] == WORKERS
    assert {kind: model["backend"] for kind, model in health["models"].items()} == {
        "embedder": "transformers",
        "reranker": "transformers",
    }


@pytest.mark.parametrize(("method", "path", "payload"), ROUTES, ids=[route[1] for route in ROUTES])
def test_every_route_needs_the_key(server, method, path, payload):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        response = httpx.request(method, server.url + path, json=payload, headers=headers, timeout=60)
        assert response.status_code == 401, (path, headers, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
    response = httpx.request(method, server.url + path, json=payload, headers=server.headers, timeout=60)
    assert response.status_code == 200, (path, response.text)


def test_embeddings_equal_unime_load(client, reference, serve_inputs):
    images, captions = serve_inputs
    items = [captions[0], {"image": data_url(images[0])}, {"text": captions[1], "image": data_url(images[1])}]
    for input_type in (None, "query"):
        got = embed(client, {"input": items, "input_type": input_type})
        expected = reference[0].encode(
            [captions[0], images[0], {"text": captions[1], "image": images[1]}], prompt_name=input_type
        )
        assert cosines(got, expected).min() >= 0.9999
    short = embed(client, {"input": captions, "dimensions": 16})
    np.testing.assert_allclose(short, reference[0].encode(captions, truncate_dim=16), atol=1e-5)


def test_rerank_equals_reranker_predict(client, reference, serve_inputs):
    images, captions = serve_inputs
    documents = [captions[0], {"image": data_url(images[0])}, {"text": captions[1], "image": data_url(images[1])}]
    body = client.post("/v1/rerank", json={"query": captions[0], "documents": documents}).json()
    expected = reference[1].predict(
        [(captions[0], captions[0]), (captions[0], images[0]), (captions[0], {"text": captions[1], "image": images[1]})]
    )
    scores = {row["index"]: row["relevance_score"] for row in body["results"]}
    np.testing.assert_allclose([scores[i] for i in range(3)], expected, atol=1e-4)


@pytest.mark.parametrize(
    ("path", "name", "payload", "status", "param", "index"), BAD_INPUTS, ids=[bad[1] for bad in BAD_INPUTS]
)
def test_bad_requests_name_field_and_index(client, path, name, payload, status, param, index):
    response = client.post(path, json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["index"]) == (param, index), error


def test_requests_of_both_workers_merge_and_metrics_count_the_whole_server(server, client, reference, serve_inputs):
    _, captions = serve_inputs
    texts = [f"{captions[i % 4]} number {i}" for i in range(24)]
    before = client.get("/metrics").text
    bad = client.post("/v1/embeddings", json={"input": "a", "dimensions": "16"})  # this test's own client error
    assert bad.status_code == 400, bad.text

    def one(text: str) -> np.ndarray:
        with server.client() as http:  # a connection each: the kernel spreads them over the workers
            for _ in range(100):  # the queue holds MAX_QUEUE requests: a refused one (503) tries again
                response = http.post("/v1/embeddings", json={"input": [text]})
                if response.status_code != 503:
                    break
                time.sleep(0.05)
            assert response.status_code == 200, response.text
            return np.array(response.json()["data"][0]["embedding"], dtype=np.float32)

    with ThreadPoolExecutor(24) as pool:
        vectors = np.stack(list(pool.map(one, texts)))
    assert cosines(vectors, reference[0].encode(texts)).min() >= 0.9999  # each got its own vector back

    def grown(after: str, name: str, **labels: str) -> float:
        return metric_value(after, name, 0, **labels) - metric_value(before, name, 0, **labels)

    for _ in range(6):  # whichever worker answers /metrics, it reports the whole server
        after = client.get("/metrics").text
        assert grown(after, "unime_requests_total", route="/v1/embeddings", status="200") == 24
        refused = grown(after, "unime_requests_total", route="/v1/embeddings", status="503")
        assert grown(after, "unime_requests_total", route="/v1/embeddings", status="400") == 1
        assert grown(after, "unime_request_latency_seconds_count", route="/v1/embeddings") == 24 + refused + 1
        assert grown(after, "unime_batch_requests_sum", model="tiny-embedder") == 24
        assert grown(after, "unime_batch_requests_count", model="tiny-embedder") < 24, "nothing was merged"
        assert metric_value(after, "unime_queue_depth", model="tiny-embedder") == 0
        assert metric_value(after, "unime_requests_in_flight") == 1  # this /metrics request
        assert grown(after, "unime_errors_total", route="/v1/embeddings", type="400") == 1


def test_full_queue_answers_503_with_retry_after(server, heavy_items):
    """The model process refuses (its queue is full); the worker answers as one process would."""
    assert_full_queue_answers_503(server, heavy_items, MAX_QUEUE)


def test_models_list_the_embedder_size_and_trained_dims_from_either_worker(server):
    for _ in range(4):  # fresh connections land on either worker
        listed = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]
        embedder = next(m for m in listed if m["kind"] == "embedder")
        assert (embedder["dimensions"], embedder["matryoshka_dimensions"]) == (64, [32, 16])


def test_ready_reads_the_model_process_queue_in_every_worker(server, heavy_items):
    """Each worker's /ready answers from the model process's queue (shared memory): 503 exactly while a request
    there has waited longer than --max-queue-wait-s, 200 again once it drained."""

    def one(_: int) -> int:
        body = {"input": heavy_items * 4}
        return httpx.post(f"{server.url}/v1/embeddings", json=body, headers=server.headers, timeout=120).status_code

    seen = []
    for _burst in range(3):  # sliced requests interleave, so a long wait needs a few of them queued at once
        with ThreadPoolExecutor(MAX_QUEUE) as pool:
            answers = pool.map(one, range(2 * MAX_QUEUE))
            deadline = time.monotonic() + 30
            while not any(r.status_code == 503 for r in seen) and time.monotonic() < deadline:
                seen.append(httpx.get(f"{server.url}/ready", headers=server.headers, timeout=60))
                time.sleep(0.01)
            assert set(answers) <= {200, 503}
        if any(r.status_code == 503 for r in seen):
            break
    for response in seen:
        waited = response.json()["models"]["embedder"]["oldest_wait_s"]  # rounded to the millisecond
        if abs(waited - MAX_QUEUE_WAIT_S) > 0.001:
            assert response.status_code == (503 if waited > MAX_QUEUE_WAIT_S else 200), response.text
    not_ready = [r for r in seen if r.status_code == 503]
    assert not_ready, "no worker's /ready saw a request wait in the model process's queue"
    assert not_ready[0].headers["Retry-After"] == "1"
    # Drained: every worker (fresh connections land on either) is ready again.
    assert {httpx.get(f"{server.url}/ready", headers=server.headers).status_code for _ in range(8)} == {200}


@pytest.mark.slow  # starts a server of its own
def test_graceful_shutdown_finishes_requests_in_flight(serve_models, heavy_items, tmp_path):
    """Every request sent before SIGTERM answers 200. A server of its own: stopping it leaves the module's running."""
    server = start_server(server_args(serve_models), tmp_path / "http-workers-stopped.log", timeout=180)
    try:
        assert_graceful_stop_under_load(server, heavy_items * 4, clients=MAX_QUEUE)
    finally:
        server.stop()


@pytest.mark.slow  # starts a server of its own
def test_a_worker_killed_stops_the_server_with_an_error(serve_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-logs") / "http-workers-killed.log"
    args = [*model_args(serve_models, reranker=False), "--http-workers", str(WORKERS)]
    proc = start_server(args, log, timeout=180)
    try:
        pids: set[int] = set()
        for _ in range(10):
            pids |= _worker_pids(proc, connections=8)
            if len(pids) == WORKERS:
                break
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        status = proc.process.wait(timeout=60)
    finally:
        proc.stop()
    assert status != 0, proc.log()
    assert f"(pid {victim}) exited unexpectedly (killed by SIGKILL)" in proc.log()


# ------------------------------------------------------------------------------------------------------------
# Errors across the pipe: rebuilt into the same HTTP answer
# ------------------------------------------------------------------------------------------------------------
def test_errors_cross_the_pipe_as_their_fields():
    from unime.serve.app import error_response

    def answer(err: Exception) -> tuple[int, dict, str | None]:
        response = error_response(err)
        return response.status_code, response.body, response.headers.get("retry-after")

    request_error = RequestError("too big", param="input[2].image", index=2, status=413)
    assert answer(error_from_fields(error_fields(request_error))) == answer(request_error)
    full = QueueFullError("tiny", retry_after_s=3)
    assert answer(error_from_fields(error_fields(full))) == answer(full)
    assert answer(full)[2] == "3"
    invalid = InvalidInputError(3, "the engine refused the input")  # as the app maps it
    assert answer(error_from_fields(error_fields(invalid))) == answer(RequestError(str(invalid), index=3))
    other = error_from_fields(error_fields(RuntimeError("CUDA out of memory")))
    assert isinstance(other, ModelProcessError)
    assert (other.type_name, str(other)) == ("RuntimeError", "CUDA out of memory")


# ------------------------------------------------------------------------------------------------------------
# vLLM: the backend lives in the main process; one test, slow (an engine start)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_backend_behind_http_workers(serve_models, reference, serve_inputs, tmp_path_factory):
    images, captions = serve_inputs
    tmp = tmp_path_factory.mktemp("vllm-http-workers")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp / "cache")}
    args = [*model_args(serve_models, reranker=False, backend="vllm"), "--enforce-eager", "--http-workers", "2"]
    proc = start_server(args, tmp / "server.log", timeout=400, env=env)
    try:
        with proc.client() as http:
            assert http.get("/health").json()["models"]["embedder"]["backend"] == "vllm"
            items = [captions[0], {"text": captions[1], "image": data_url(images[1])}]
            got = embed(http, {"input": items, "input_type": "query"})
        expected = reference[0].encode([captions[0], {"text": captions[1], "image": images[1]}], prompt_name="query")
        assert cosines(got, expected).min() >= 0.9999
    finally:
        assert proc.stop() == 0, proc.log()
