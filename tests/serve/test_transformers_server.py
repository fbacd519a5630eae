"""The real server (transformers backend) in a subprocess: routes, auth, bad input, parity with unime.load."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.server_process import b64_image, cosines, data_url, embed, metric_value, model_args, start_server

MAX_ITEMS = 8
MAX_BODY = 200_000
MAX_TEXT = 2_000
MAX_PIXELS = 300 * 300


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-logs") / "transformers.log"
    args = [
        *model_args(serve_models),
        "--max-items",
        str(MAX_ITEMS),
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-text-chars",
        str(MAX_TEXT),
        "--max-image-pixels",
        str(MAX_PIXELS),
        "--batch-wait-ms",
        "20",
    ]
    proc = start_server(args, log, timeout=120)
    yield proc
    assert proc.stop() == 0, proc.log()


# ------------------------------------------------------------------------------------------------------------
# Routes and auth
# ------------------------------------------------------------------------------------------------------------
ROUTES = [
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("POST", "/v1/embeddings", {"input": "a red circle"}),
    ("POST", "/v1/rerank", {"query": "a red circle", "documents": ["a red circle", "a blue square"]}),
]


@pytest.mark.parametrize(("method", "path", "payload"), ROUTES, ids=[route[1] for route in ROUTES])
def test_every_route_needs_the_key(server, method, path, payload):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": server.api_key}):
        response = httpx.request(method, server.url + path, json=payload, headers=headers, timeout=60)
        assert response.status_code == 401, (path, headers, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
    response = httpx.request(method, server.url + path, json=payload, headers=server.headers, timeout=60)
    assert response.status_code == 200, (path, response.text)


def test_models_health_and_openapi(client):
    models = client.get("/v1/models").json()
    assert {(m["id"], m["kind"]) for m in models["data"]} == {
        ("tiny-embedder", "embedder"),
        ("tiny-reranker", "reranker"),
    }
    embedder = next(m for m in models["data"] if m["kind"] == "embedder")
    # The directory's size and trained truncations (conftest records [32, 16]); any size up to 64 is accepted.
    assert (embedder["dimensions"], embedder["matryoshka_dimensions"]) == (64, [32, 16])
    assert client.get("/health").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert {"/v1/embeddings", "/v1/rerank", "/health", "/v1/models", "/metrics"} <= set(schema["paths"])
    body_ref = schema["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_ref["$ref"].endswith("/EmbeddingRequest")
    assert "input" in schema["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert "InputItem" in schema["components"]["schemas"]


# ------------------------------------------------------------------------------------------------------------
# Embeddings: the same vectors as unime.load(dir).encode
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("input_type", [None, "query", "document"])
def test_embeddings_equal_unime_load(client, reference, serve_inputs, input_type):
    images, captions = serve_inputs
    items = [
        captions[0],
        {"image": data_url(images[0])},
        {"text": captions[1], "image": data_url(images[1], "JPEG")},
        {"text": captions[2]},
        {"image": b64_image(images[2])},  # bare base64
    ]
    expected = reference[0].encode(
        [
            captions[0],
            _decoded(items[1]["image"]),
            {"text": captions[1], "image": _decoded(items[2]["image"])},
            captions[2],
            images[2],
        ],
        prompt_name=input_type,
    )
    got = embed(client, {"input": items, "input_type": input_type, "model": "tiny-embedder"})
    assert got.shape == expected.shape
    assert cosines(got, expected).min() >= 0.9999


def _decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def test_instruction_changes_the_vector_and_matches_encode_prompt(client, reference, serve_inputs):
    _, captions = serve_inputs
    plain = embed(client, {"input": captions[:2]})
    instructed = embed(client, {"input": captions[:2], "instruction": "Retrieve a drawing."})
    expected = reference[0].encode(captions[:2], prompt="Retrieve a drawing.")
    assert cosines(instructed, expected).min() >= 0.9999
    assert cosines(plain, instructed).max() < 0.9999


def test_one_string_input_gives_one_vector(client, reference):
    got = embed(client, {"input": "a red circle on the left"})
    assert got.shape == (1, reference[0].embedding_dim)
    assert cosines(got, reference[0].encode(["a red circle on the left"])).min() >= 0.9999


def test_dimensions_and_base64(client, reference, serve_inputs):
    _, captions = serve_inputs
    full = embed(client, {"input": captions})
    short = embed(client, {"input": captions, "dimensions": 16})
    assert short.shape == (len(captions), 16)
    np.testing.assert_allclose(short, reference[0].encode(captions, truncate_dim=16), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    encoded = client.post("/v1/embeddings", json={"input": captions, "encoding_format": "base64"}).json()
    decoded = np.stack([np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4") for row in encoded["data"]])
    # Equal up to the batch: two requests may run in forward passes of other shapes (the server plans them by the
    # pass costs it has learnt), which moves float32 sums by a few ulps; a wrong byte order or width would not pass.
    np.testing.assert_allclose(decoded, full, rtol=0, atol=1e-6)


def test_openai_client_reads_our_embeddings(server, reference, serve_inputs):
    import openai

    _, captions = serve_inputs
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key)
    response = client.embeddings.create(model="tiny-embedder", input=captions)  # the client asks for base64
    got = np.array([row.embedding for row in response.data], dtype=np.float32)
    assert cosines(got, reference[0].encode(captions)).min() >= 0.9999
    assert response.usage.prompt_tokens > 0
    short = client.embeddings.create(model="tiny-embedder", input=captions[0], dimensions=32, encoding_format="float")
    assert len(short.data[0].embedding) == 32
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong").embeddings.create(model="x", input="a")


# ------------------------------------------------------------------------------------------------------------
# Rerank: the same scores as Reranker.predict
# ------------------------------------------------------------------------------------------------------------
def test_rerank_equals_reranker_predict(client, reference, serve_inputs):
    images, captions = serve_inputs
    documents = [captions[0], {"image": data_url(images[0])}, {"text": captions[1], "image": data_url(images[1])}]
    response = client.post(
        "/v1/rerank",
        json={"query": captions[0], "documents": documents, "return_documents": True, "model": "tiny-reranker"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference[1].predict(
        [
            (captions[0], captions[0]),
            (captions[0], images[0]),
            (captions[0], {"text": captions[1], "image": images[1]}),
        ]
    )
    scores = {row["index"]: row["relevance_score"] for row in body["results"]}
    assert sorted(scores) == [0, 1, 2]
    np.testing.assert_allclose([scores[i] for i in range(3)], expected, atol=1e-4)
    assert [row["relevance_score"] for row in body["results"]] == sorted(scores.values(), reverse=True)
    assert [row["document"] for row in body["results"]] == [
        {"text": documents[row["index"]]} if isinstance(documents[row["index"]], str) else documents[row["index"]]
        for row in body["results"]
    ]
    assert body["usage"]["prompt_tokens"] > 0


def test_rerank_top_n_image_query_and_instruction(client, reference, serve_inputs):
    images, captions = serve_inputs
    payload = {"query": {"image": data_url(images[3])}, "documents": captions, "top_n": 2, "instruction": "Match it."}
    body = client.post("/v1/rerank", json=payload).json()
    expected = reference[1].predict([(images[3], caption) for caption in captions], instruction="Match it.")
    assert len(body["results"]) == 2
    assert [row["index"] for row in body["results"]] == list(np.argsort(-expected, kind="stable")[:2])
    assert all("document" not in row for row in body["results"])
    np.testing.assert_allclose(
        [row["relevance_score"] for row in body["results"]], np.sort(expected)[::-1][:2], atol=1e-4
    )


# ------------------------------------------------------------------------------------------------------------
# Bad input: a 4xx naming the field and index; the server stays healthy
# ------------------------------------------------------------------------------------------------------------
def _png_bytes(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")
    return buffer.getvalue()


BIG_IMAGE = "data:image/png;base64," + base64.b64encode(_png_bytes((2000, 2000))).decode()
TEXT_AS_IMAGE = "data:image/png;base64," + base64.b64encode(b"this is not an image at all").decode()

BAD_EMBEDDINGS = [
    ("not an object", [1, 2], 400, "body", None),
    ("missing input", {"model": "tiny-embedder"}, 400, "input", None),
    ("input a number", {"input": 5}, 400, "input", None),
    ("token ids", {"input": [[1, 2, 3]]}, 400, "input[0]", 0),
    ("empty list", {"input": []}, 400, "input", None),
    ("empty text", {"input": ["a cat", "   "]}, 400, "input[1]", 1),
    ("too many items", {"input": ["a"] * (MAX_ITEMS + 1)}, 413, "input", None),
    ("text too long", {"input": ["a", "b" * (MAX_TEXT + 1)]}, 413, "input[1]", 1),
    ("item with no field", {"input": ["a", {}]}, 400, "input[1]", 1),
    ("unknown item key", {"input": [{"txt": "a"}]}, 400, "input[0]", 0),
    ("text not a string", {"input": [{"text": 3}]}, 400, "input[0].text", 0),
    ("broken base64", {"input": ["a", {"image": "data:image/png;base64,@@@not-base64"}]}, 400, "input[1].image", 1),
    ("non-image payload", {"input": [{"text": "a", "image": TEXT_AS_IMAGE}]}, 400, "input[0].image", 0),
    ("too many pixels", {"input": ["a", "b", {"image": BIG_IMAGE}]}, 413, "input[2].image", 2),
    ("remote URL not allowed", {"input": [{"image": "http://127.0.0.1:1/x.png"}]}, 400, "input[0].image", 0),
    ("local path", {"input": [{"image": "/etc/hosts"}]}, 400, "input[0].image", 0),
    ("file URL", {"input": [{"image": "file:///etc/hosts"}]}, 400, "input[0].image", 0),
    ("wrong encoding", {"input": "a", "encoding_format": "int8"}, 400, "encoding_format", None),
    ("dimensions too large", {"input": "a", "dimensions": 10_000}, 400, "dimensions", None),
    ("dimensions not int", {"input": "a", "dimensions": "16"}, 400, "dimensions", None),
    ("unknown input type", {"input": "a", "input_type": "passage"}, 400, "input_type", None),
    ("unknown field", {"input": "a", "normalize": False}, 400, "normalize", None),
    ("unknown model", {"input": "a", "model": "gpt-4"}, 404, "model", None),
]


@pytest.mark.parametrize(
    ("name", "payload", "status", "param", "index"), BAD_EMBEDDINGS, ids=[b[0] for b in BAD_EMBEDDINGS]
)
def test_bad_embedding_requests(client, name, payload, status, param, index):
    response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["index"]) == (param, index), error
    assert param in error["message"]


BAD_RERANKS = [
    ("missing documents", {"query": "a"}, 400, "documents", None),
    ("documents not a list", {"query": "a", "documents": "b"}, 400, "documents", None),
    ("empty documents", {"query": "a", "documents": []}, 400, "documents", None),
    ("too many documents", {"query": "a", "documents": ["b"] * (MAX_ITEMS + 1)}, 413, "documents", None),
    ("bad document image", {"query": "a", "documents": ["b", {"image": TEXT_AS_IMAGE}]}, 400, "documents[1].image", 1),
    ("bad query", {"query": 3, "documents": ["b"]}, 400, "query", None),
    ("negative top_n", {"query": "a", "documents": ["b"], "top_n": -1}, 400, "top_n", None),
    (
        "return_documents not bool",
        {"query": "a", "documents": ["b"], "return_documents": "yes"},
        400,
        "return_documents",
        None,
    ),
]


@pytest.mark.parametrize(("name", "payload", "status", "param", "index"), BAD_RERANKS, ids=[b[0] for b in BAD_RERANKS])
def test_bad_rerank_requests(client, name, payload, status, param, index):
    response = client.post("/v1/rerank", json=payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["index"]) == (param, index), error


def test_malformed_json_and_oversized_bodies(server, client):
    response = client.post("/v1/embeddings", content=b'{"input": ["a",', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "body"
    big = {"input": ["word " * 300] * 200}
    response = client.post("/v1/embeddings", json=big)  # declared Content-Length above the limit
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"

    def chunks():  # no Content-Length: the body is counted as it streams in
        yield b'{"input": ["'
        for _ in range(60):
            yield b"x" * 4096
        yield b'"]}'

    response = client.post("/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text


def test_server_stays_healthy_after_bad_input(client, reference):
    for payload in (row[1] for row in BAD_EMBEDDINGS):
        client.post("/v1/embeddings", json=payload)
    assert client.get("/health").json()["status"] == "ok"
    got = embed(client, {"input": ["still works"]})
    assert cosines(got, reference[0].encode(["still works"])).min() >= 0.9999


# ------------------------------------------------------------------------------------------------------------
# Micro-batching and metrics
# ------------------------------------------------------------------------------------------------------------
def test_concurrent_requests_are_merged_and_metrics_count_them(server, client, reference, serve_inputs):
    _, captions = serve_inputs
    texts = [f"{captions[i % 4]} number {i}" for i in range(24)]
    before = client.get("/metrics").text
    batches_before = metric_value(before, "unime_batch_requests_count", 0, model="tiny-embedder")
    requests_before = metric_value(before, "unime_batch_requests_sum", 0, model="tiny-embedder")
    # This test's own client error and rerank, counted below: it may run first, or alone.
    bad = client.post("/v1/embeddings", json={"input": "a", "dimensions": "16"})
    assert bad.status_code == 400, bad.text
    rerank = client.post("/v1/rerank", json={"query": captions[0], "documents": captions[1:3]})
    assert rerank.status_code == 200, rerank.text

    def one(text: str) -> np.ndarray:
        with server.client() as http:
            return embed(http, {"input": [text]})[0]

    with ThreadPoolExecutor(24) as pool:
        vectors = np.stack(list(pool.map(one, texts)))
    assert cosines(vectors, reference[0].encode(texts)).min() >= 0.9999  # each got its own vector back

    after = client.get("/metrics").text
    batches = metric_value(after, "unime_batch_requests_count", model="tiny-embedder") - batches_before
    merged = metric_value(after, "unime_batch_requests_sum", model="tiny-embedder") - requests_before
    assert merged == 24
    assert batches < 24, "no two concurrent requests were merged into one batch"
    assert metric_value(after, "unime_requests_total", route="/v1/embeddings", status="200") >= 24
    errors = metric_value(after, "unime_errors_total", route="/v1/embeddings", type="400") - metric_value(
        before, "unime_errors_total", 0, route="/v1/embeddings", type="400"
    )
    assert errors == 1
    assert metric_value(after, "unime_queue_depth", model="tiny-embedder") == 0
    assert metric_value(after, "unime_request_latency_seconds_count", route="/v1/embeddings") >= 24
    assert metric_value(after, "unime_batch_items_count", model="tiny-reranker") > metric_value(
        before, "unime_batch_items_count", 0, model="tiny-reranker"
    )
    assert metric_value(after, "unime_requests_in_flight") == 1  # this /metrics request
