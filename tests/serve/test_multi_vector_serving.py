"""Serving a multi-vector model (both backends): token matrices from `/v1/embeddings` and MaxSim ranking from
`/v1/rerank`, the same as `unime.load(dir)` computes them; bad input answered with the field and item at fault.

One real `unime serve` subprocess per module hosts a tiny Qwen2-VL embedder with a multi-vector head, beside the
session's tiny reranker (transformers backend); a second one, with the vLLM backend, hosts a tiny Qwen3-VL one on
vLLM's ColQwen3 class (the one vLLM engine of the module). The refusals of a single-vector model and of the vLLM
backend are decided before a request reaches a model: they are checked on the app in process (as a server, or an
HTTP worker, runs it).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.serve.server_process import cosines, data_url, embed, model_args, start_server
from unime.serve.app import create_app
from unime.serve.backends import BatchResult, TransformersEmbedder
from unime.serve.config import ServeConfig
from unime.serve.hosting import HostedModel, host_models, join_batches, split_batch
from unime.serve.metrics import ServerMetrics
from unime.serve.micro_batching import MicroBatcher
from unime.serve.workers import BackendInfo

pytestmark = pytest.mark.slow

MAX_TOKENS_PER_ITEM = 120
MODEL = "tiny-multi-vector"


QUERY_INSTRUCTION = "Find the page that answers the question."
DOCUMENT_INSTRUCTION = "Represent the page for retrieval."


def save_multi_vector_model(directory: Path, backbone: str, seed: int = 3) -> Path:
    """A tiny embedder of `backbone` with a multi-vector head (128-d token vectors) and query/document instructions."""
    import unime

    embedder = unime.build_tiny(backbone, seed=seed, multi_vector=unime.MultiVectorConfig())
    embedder.config.prompts = dataclasses.replace(
        embedder.config.prompts, query_instruction=QUERY_INSTRUCTION, document_instruction=DOCUMENT_INSTRUCTION
    )
    embedder.save(directory)
    return directory


@pytest.fixture(scope="module")
def multi_vector_dir(tmp_path_factory):
    """A tiny Qwen2-VL embedder with a multi-vector head."""
    return save_multi_vector_model(tmp_path_factory.mktemp("serve-multi-vector") / MODEL, "qwen2_vl")


@pytest.fixture(scope="module")
def local(multi_vector_dir):
    import unime

    return unime.load(multi_vector_dir)


@pytest.fixture(scope="module")
def server(multi_vector_dir, serve_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-logs") / "multi-vector.log"
    models = {"embedder": multi_vector_dir, "reranker": serve_models["reranker"]}
    # Through an HTTP worker: requests for token vectors and their matrices cross the pipe to the model process
    # (one process runs the same routes: `test_in_one_process_the_token_matrices_are_the_same`).
    args = [*model_args(models), "--max-tokens-per-item", str(MAX_TOKENS_PER_ITEM), "--max-items", "8"]
    args += ["--http-workers", "1"]
    proc = start_server(args, log, timeout=120)
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def mixed_inputs(serve_inputs):
    """Texts, an image alone and a text+image item: as the server takes them, and as `encode` takes them."""
    images, captions = serve_inputs
    served = [captions[0], {"image": data_url(images[1])}, {"text": captions[2], "image": data_url(images[2])}]
    local = [captions[0], images[1], {"text": captions[2], "image": images[2]}]
    return served, local


def token_matrices(client: httpx.Client | TestClient, payload: dict) -> list[np.ndarray]:
    """The token matrices of a 200 answer (float lists or base64, by the payload), checked for order and counts."""
    response = client.post("/v1/embeddings", json={"model": MODEL, "output": "multi_vector", **payload})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [row["index"] for row in body["data"]] == list(range(len(body["data"])))
    matrices = []
    for row in body["data"]:
        if payload.get("encoding_format") == "base64":
            dtype = "<f2" if payload.get("dtype") == "float16" else "<f4"
            matrix = np.frombuffer(base64.b64decode(row["embedding"]), dtype=dtype).astype(np.float32).reshape(-1, 128)
        else:
            matrix = np.asarray(row["embedding"], dtype=np.float32)
        assert matrix.shape == (row["num_tokens"], 128)
        matrices.append(matrix)
    assert body["usage"]["prompt_tokens"] == sum(len(m) for m in matrices)  # every token kept (tokens="all")
    return matrices


def assert_same_tokens(served: list[np.ndarray], local: list[np.ndarray], min_cosine: float = 0.9999) -> None:
    assert [len(m) for m in served] == [len(m) for m in local]
    for index, (a, b) in enumerate(zip(served, local, strict=True)):
        worst = cosines(a, b).min()
        assert worst >= min_cosine, f"input {index}: a token's cosine is {worst}"


def assert_refused(response: httpx.Response, status: int, param: str, index: int | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"], error["index"]) == (status, param, index), error
    return error


# ------------------------------------------------------------------------------------------------------------
# Token matrices
# ------------------------------------------------------------------------------------------------------------
def test_served_token_matrices_equal_local_encode(client, local, mixed_inputs):
    served_items, local_items = mixed_inputs
    served = token_matrices(client, {"input": served_items, "input_type": "document"})
    expected = local.encode_document(local_items, output="multi_vector")
    assert_same_tokens(served, expected)
    # With no instruction, the prompts are shorter: the count follows the prompt, not a fixed size.
    plain = token_matrices(client, {"input": served_items[:1]})
    assert_same_tokens(plain, local.encode(local_items[:1], output="multi_vector"))
    assert len(plain[0]) < len(served[0])


def test_base64_float32_and_float16_decode_to_the_float_matrices(client, mixed_inputs):
    served_items, _ = mixed_inputs
    floats = token_matrices(client, {"input": served_items})
    as_float32 = token_matrices(client, {"input": served_items, "encoding_format": "base64"})
    as_float16 = token_matrices(client, {"input": served_items, "encoding_format": "base64", "dtype": "float16"})
    for exact, packed, half in zip(floats, as_float32, as_float16, strict=True):
        # The same float32 numbers, in bytes, up to the batch: the server cuts forward passes by the pass costs it
        # has learnt (`unime.pass_planning`), so two requests may run in passes of other shapes, which moves float32
        # sums by a few ulps (seen: 6e-8). A wrong byte order or width would be off by far more.
        np.testing.assert_allclose(packed, exact, rtol=0, atol=1e-6)
        np.testing.assert_allclose(half, exact, atol=1e-3)  # unit vectors: float16 keeps ~3 decimals
        assert cosines(half, exact).min() >= 0.9999


def test_a_plain_request_to_a_multi_vector_model_gives_single_vectors(client, local, mixed_inputs):
    served_items, local_items = mixed_inputs
    vectors = embed(client, {"input": served_items, "input_type": "query"})
    assert vectors.shape == (3, local.embedding_dim)
    assert cosines(vectors, local.encode_query(local_items)).min() >= 0.9999
    embedder = next(m for m in client.get("/v1/models").json()["data"] if m["kind"] == "embedder")
    assert (embedder["id"], embedder["multi_vector_dimensions"]) == (MODEL, 128)


# ------------------------------------------------------------------------------------------------------------
# MaxSim reranking
# ------------------------------------------------------------------------------------------------------------
def test_rerank_naming_the_embedder_scores_by_local_maxsim(client, local, serve_inputs):
    images, captions = serve_inputs
    documents = [captions[1], {"image": data_url(images[0])}, captions[3], {"text": captions[0]}]
    response = client.post(
        "/v1/rerank", json={"model": MODEL, "query": captions[0], "documents": documents, "return_documents": True}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["usage"]["prompt_tokens"] > 0
    served = {row["index"]: row["relevance_score"] for row in body["results"]}
    local_documents = [captions[1], images[0], captions[3], captions[0]]
    query = local.encode_query([captions[0]], output="multi_vector")
    expected = local.maxsim(query, local.encode_document(local_documents, output="multi_vector"))[0].numpy()
    np.testing.assert_allclose([served[i] for i in range(4)], expected, rtol=1e-4, atol=1e-4)
    scores = [row["relevance_score"] for row in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [row["document"] for row in body["results"]] == [
        {"text": d} if isinstance(d, str) else d for d in (documents[row["index"]] for row in body["results"])
    ]
    # The request's instruction replaces the query's; top_n keeps the best.
    asked = client.post(
        "/v1/rerank",
        json={"model": MODEL, "query": captions[0], "documents": documents, "instruction": "Match it.", "top_n": 2},
    ).json()
    query = local.encode([captions[0]], prompt="Match it.", output="multi_vector")
    expected = local.maxsim(query, local.encode_document(local_documents, output="multi_vector"))[0].numpy()
    assert [row["index"] for row in asked["results"]] == list(np.argsort(-expected, kind="stable")[:2])
    np.testing.assert_allclose(
        [row["relevance_score"] for row in asked["results"]], np.sort(expected)[::-1][:2], rtol=1e-4, atol=1e-4
    )


def test_rerank_without_a_model_name_still_uses_the_reranker(client, serve_inputs):
    _, captions = serve_inputs
    body = client.post("/v1/rerank", json={"query": captions[0], "documents": captions[:3]}).json()
    assert body["model"] == "tiny-reranker"
    assert all(0.0 <= row["relevance_score"] <= 1.0 for row in body["results"])  # p(yes), not a MaxSim sum


def test_the_new_requests_need_the_key(server):
    for path, payload in (
        ("/v1/embeddings", {"input": "a page", "output": "multi_vector"}),
        ("/v1/rerank", {"model": MODEL, "query": "a page", "documents": ["a page"]}),
    ):
        response = httpx.post(server.url + path, json=payload, timeout=60)
        assert response.status_code == 401, response.text
        assert httpx.post(server.url + path, json=payload, headers=server.headers, timeout=60).status_code == 200


# ------------------------------------------------------------------------------------------------------------
# Bad input: the field and item at fault, and the server stays healthy
# ------------------------------------------------------------------------------------------------------------
LONG_TEXT = "the quarterly report lists revenue " * 30  # well over MAX_TOKENS_PER_ITEM tokens
BAD_REQUESTS = [
    pytest.param(
        "/v1/embeddings",
        {"input": ["a short page", LONG_TEXT], "output": "multi_vector"},
        (413, "input[1]", 1),
        "max_tokens_per_item",
        id="matrix-over-max-tokens-per-item",
    ),
    pytest.param(
        "/v1/embeddings",
        {"input": ["a page"], "output": "multi_vector", "dimensions": 16},
        (400, "dimensions", None),
        "single_vector",
        id="dimensions-with-token-vectors",
    ),
    pytest.param(
        "/v1/embeddings",
        {"input": ["a page"], "output": "multi_vector", "dtype": "float16"},
        (400, "dtype", None),
        "base64",
        id="float16-without-base64",
    ),
    pytest.param(
        "/v1/embeddings",
        {"input": ["a page"], "output": "tokens"},
        (400, "output", None),
        "multi_vector",
        id="unknown-output",
    ),
    pytest.param(
        "/v1/embeddings",
        {"input": ["a page"], "output": "multi_vector", "dtype": "int8", "encoding_format": "base64"},
        (400, "dtype", None),
        "float16",
        id="unknown-dtype",
    ),
    pytest.param(
        "/v1/rerank",
        {"model": MODEL, "query": "a page", "documents": ["a page", {"text": ""}]},
        (400, "documents[1].text", 1),
        "empty",
        id="rerank-empty-document",
    ),
]


@pytest.mark.parametrize(("path", "payload", "where", "words"), BAD_REQUESTS)
def test_bad_input_names_the_field_and_item_and_the_server_stays_healthy(client, path, payload, where, words):
    status, param, index = where
    error = assert_refused(client.post(path, json=payload), status, param, index)
    assert words in error["message"], error
    assert client.get("/health").json()["status"] == "ok"
    assert len(token_matrices(client, {"input": ["a short page"]})) == 1


def test_the_token_limit_counts_the_returned_matrix(client, local):
    # The longest prefix of LONG_TEXT (in words) whose matrix fits comes back whole; one word more is refused.
    words = LONG_TEXT.split()
    counts = [len(local.encode(" ".join(words[:k]), output="multi_vector")) for k in range(1, len(words) + 1)]
    fits = max(k for k, count in enumerate(counts, start=1) if count <= MAX_TOKENS_PER_ITEM)
    (matrix,) = token_matrices(client, {"input": [" ".join(words[:fits])]})
    assert len(matrix) == counts[fits - 1] <= MAX_TOKENS_PER_ITEM
    too_long = {"input": ["a short page", " ".join(words[: fits + 1])], "output": "multi_vector"}
    error = assert_refused(client.post("/v1/embeddings", json=too_long), 413, "input[1]", 1)
    assert f"holds {counts[fits]} token vectors" in error["message"]
    assert f"at most {MAX_TOKENS_PER_ITEM}" in error["message"]


# ------------------------------------------------------------------------------------------------------------
# Refused before the model: a single-vector model, and the vLLM backend (the app in process)
# ------------------------------------------------------------------------------------------------------------
def unused_model(items, instructions) -> BatchResult:
    raise AssertionError("a refused request reached the model")


def app_with_embedder(directory, name: str, backend) -> tuple[TestClient, HostedModel]:
    config = ServeConfig(embedder_dir=str(directory))
    metrics = ServerMetrics()
    if isinstance(backend, BackendInfo):  # what an HTTP worker sees of a backend in the model process
        batcher = MicroBatcher(
            name, unused_model, split_batch, join=join_batches, max_queue=4, max_batch_items=4,
            max_batch_tokens=10_000, wait_ms=0, batching=True, retry_after_s=1,
        )  # fmt: skip
        hosted = {"embedder": HostedModel(name, "embedder", backend, batcher)}
    else:
        hosted = host_models(config, metrics, embedder=backend, reranker=None, embedder_name=name, reranker_name=None)
    return TestClient(create_app(config, hosted, metrics)), hosted["embedder"]


def test_a_single_vector_model_refuses_token_vectors_naming_the_field_and_model(serve_models):
    backend = TransformersEmbedder(str(serve_models["embedder"]), dtype=None, device="cpu", max_batch_items=8)
    http, hosted = app_with_embedder(serve_models["embedder"], "single", backend)
    try:
        with http:
            error = assert_refused(
                http.post("/v1/embeddings", json={"input": "a", "output": "multi_vector"}), 400, "output"
            )
            assert "'single'" in error["message"] and "single-vector" in error["message"]
            error = assert_refused(
                http.post("/v1/rerank", json={"model": "single", "query": "a", "documents": ["b"]}), 404, "model"
            )
            assert "'single'" in error["message"] and "cannot rank" in error["message"]
            # The same request for single vectors is served.
            assert http.post("/v1/embeddings", json={"input": "a"}).status_code == 200
            assert http.get("/v1/models").json()["data"][0]["multi_vector_dimensions"] is None
    finally:
        hosted.batcher.close(5)


def test_in_one_process_the_token_matrices_are_the_same(multi_vector_dir, local, mixed_inputs):
    served_items, local_items = mixed_inputs
    backend = TransformersEmbedder(str(multi_vector_dir), dtype=None, device="cpu", max_batch_items=8)
    http, hosted = app_with_embedder(multi_vector_dir, MODEL, backend)
    try:
        with http:
            assert_same_tokens(
                token_matrices(http, {"input": served_items, "input_type": "query"}),
                local.encode_query(local_items, output="multi_vector"),
            )
    finally:
        hosted.batcher.close(5)


def test_the_vllm_backend_refuses_what_its_engine_does_not_give_before_the_model(multi_vector_dir, serve_models):
    """A multi-vector model runs on vLLM's late-interaction class (token vectors only): a plain request is a 501 naming
    "output"; a single-vector model on vLLM refuses token vectors as on transformers (400 naming "output")."""
    info = BackendInfo(name="vllm", dimension=64, multi_vector_dim=128, single_vector=False)
    http, hosted = app_with_embedder(multi_vector_dir, MODEL, info)
    try:
        with http:
            error = assert_refused(http.post("/v1/embeddings", json={"input": "a"}), 501, "output")
            assert "token vectors of 'tiny-multi-vector' only" in error["message"], error
            assert '"output": "multi_vector"' in error["message"] and error["type"] == "not_implemented_error"
            # With no reranker hosted, a rerank naming no model is told which model ranks by MaxSim.
            error = assert_refused(http.post("/v1/rerank", json={"query": "a", "documents": ["b"]}), 404, "model")
            assert repr(MODEL) in error["message"]
    finally:
        hosted.batcher.close(5)
    http, hosted = app_with_embedder(serve_models["embedder"], "single", BackendInfo(name="vllm", dimension=64))
    try:
        with http:
            error = assert_refused(
                http.post("/v1/embeddings", json={"input": "a", "output": "multi_vector"}), 400, "output"
            )
            assert "'single'" in error["message"] and "single-vector" in error["message"]
    finally:
        hosted.batcher.close(5)


# ------------------------------------------------------------------------------------------------------------
# The vLLM backend: a Qwen3-VL multi-vector model on vLLM's ColQwen3 class, the same numbers as unime.load
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A tiny Qwen3-VL embedder with a multi-vector head (the family vLLM has a late-interaction class of)."""
    return save_multi_vector_model(tmp_path_factory.mktemp("serve-multi-vector-qwen3") / MODEL, "qwen3_vl")


@pytest.fixture(scope="module")
def qwen3_local(qwen3_dir):
    import unime

    return unime.load(qwen3_dir)


@pytest.fixture(scope="module")
def vllm_client(qwen3_dir, tmp_path_factory):
    """`unime serve --backend vllm` on the Qwen3-VL multi-vector model (no reranker: one engine)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    tmp = tmp_path_factory.mktemp("serve-multi-vector-vllm")
    args = [*model_args({"embedder": qwen3_dir}, reranker=False, backend="vllm"), "--enforce-eager"]
    args += ["--max-tokens-per-item", str(MAX_TOKENS_PER_ITEM), "--max-items", "8"]
    proc = start_server(args, tmp / "server.log", timeout=600, env={"VLLM_CACHE_ROOT": str(tmp / "cache")})
    try:
        with proc.client() as http:
            yield http
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.mark.vllm
def test_vllm_backend_token_matrices_equal_local_encode(vllm_client, qwen3_local, mixed_inputs):
    served_items, local_items = mixed_inputs
    assert vllm_client.get("/health").json()["models"]["embedder"]["backend"] == "vllm"
    served = token_matrices(vllm_client, {"input": served_items, "input_type": "document"})
    assert_same_tokens(served, qwen3_local.encode_document(local_items, output="multi_vector"))
    plain = token_matrices(vllm_client, {"input": served_items[:1], "encoding_format": "base64"})
    assert_same_tokens(plain, qwen3_local.encode(local_items[:1], output="multi_vector"))


@pytest.mark.vllm
def test_vllm_backend_ranks_by_local_maxsim(vllm_client, qwen3_local, serve_inputs):
    images, captions = serve_inputs
    documents = [captions[1], {"image": data_url(images[0])}, {"text": captions[0]}]
    body = vllm_client.post("/v1/rerank", json={"model": MODEL, "query": captions[0], "documents": documents}).json()
    served = {row["index"]: row["relevance_score"] for row in body["results"]}
    query = qwen3_local.encode_query([captions[0]], output="multi_vector")
    pages = qwen3_local.encode_document([captions[1], images[0], captions[0]], output="multi_vector")
    expected = qwen3_local.maxsim(query, pages)[0].numpy()
    np.testing.assert_allclose([served[i] for i in range(3)], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.vllm
def test_vllm_backend_bad_input_names_the_field_and_stays_healthy(vllm_client):
    error = assert_refused(vllm_client.post("/v1/embeddings", json={"input": ["a page"]}), 501, "output")
    assert "--backend transformers" in error["message"]
    too_long = {"input": ["a short page", LONG_TEXT], "output": "multi_vector"}
    error = assert_refused(vllm_client.post("/v1/embeddings", json=too_long), 413, "input[1]", 1)
    assert "max_tokens_per_item" in error["message"]
    assert vllm_client.get("/health").json()["status"] == "ok"
    assert len(token_matrices(vllm_client, {"input": ["a short page"]})) == 1


@pytest.mark.vllm
def test_vllm_backend_refuses_a_family_without_a_late_interaction_class_before_any_engine(multi_vector_dir):
    """A Qwen2-VL multi-vector model: exit 2 naming the backbone and the way out, in seconds, without a stack trace."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    command = [sys.executable, "-m", "unime.cli", "serve", str(multi_vector_dir), "--backend", "vllm"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not 'qwen2_vl'" in done.stderr and "transformers backend" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
