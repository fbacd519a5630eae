"""Limits that keep one request from stalling the server: text and token limits naming the field, a pixel
budget per request checked from image headers, large requests cut so that others run between their slices,
readiness; client mistakes answered 4xx in the API's error shape, never with internal text; a name per model."""

from __future__ import annotations

import base64
import io
import random
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.serve.server_process import data_url, model_args, start_server

MAX_TEXT = 3_000
MAX_TOKENS = 1_100
MAX_PIXELS = 300 * 300
REQUEST_PIXELS = 100_000
EMBEDDER_NAME = "embed-v1"
RERANKER_NAME = "rerank-v1"


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-logs") / "limits.log"
    args = [
        *model_args(serve_models),
        "--max-text-chars",
        str(MAX_TEXT),
        "--max-input-tokens",
        str(MAX_TOKENS),
        "--max-batch-tokens",
        str(MAX_TOKENS),
        "--max-image-pixels",
        str(MAX_PIXELS),
        "--max-request-pixels",
        str(REQUEST_PIXELS),
        "--max-items",
        "256",
        "--served-model-name",
        EMBEDDER_NAME,
        "--reranker-served-model-name",
        RERANKER_NAME,
    ]
    proc = start_server(args, log, timeout=120)
    yield proc
    assert proc.stop() == 0, proc.log()


def _words(chars: int, seed: int) -> str:
    """Caption words (a handful of characters per token for the tiny tokenizer), `chars` long."""
    rng = random.Random(seed)
    words = "a red blue green circle square triangle on the left right big small".split()
    return " ".join(rng.choice(words) for _ in range(chars // 3))[:chars]


def _png(size: tuple[int, int]) -> str:
    return data_url(Image.new("RGB", size, (200, 40, 40)))


def _truncated_png(size: tuple[int, int]) -> str:
    """A PNG whose header says `size` and whose pixel data is cut off: refused by its header or not decodable."""
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()[:200]).decode()


def _assert_error(response: httpx.Response, status: int, param: str | None, index: int | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["index"], error["code"]) == (param, index, status), error
    if param is not None:
        assert param in error["message"], error
    assert "Traceback" not in response.text and "Error:" not in response.text, response.text
    return error


# ------------------------------------------------------------------------------------------------------------
# Item limits: characters and tokens after templating, every text field
# ------------------------------------------------------------------------------------------------------------
EMOJI = "\U0001f600 " * 500  # 1,000 characters, far under the character limit, but over 2,000 tokens

OVER_LIMITS = [
    (
        "embedding instruction chars",
        "/v1/embeddings",
        {"input": "a", "instruction": "x" * (MAX_TEXT + 1)},
        "instruction",
        None,
    ),
    (
        "rerank instruction chars",
        "/v1/rerank",
        {"query": "a", "documents": ["b"], "instruction": "x" * (MAX_TEXT + 1)},
        "instruction",
        None,
    ),
    ("rerank query chars", "/v1/rerank", {"query": "q" * (MAX_TEXT + 1), "documents": ["b"]}, "query", None),
    (
        "rerank document chars",
        "/v1/rerank",
        {"query": "a", "documents": ["b", "d" * (MAX_TEXT + 1)]},
        "documents[1]",
        1,
    ),
    ("input tokens", "/v1/embeddings", {"input": ["a red circle", EMOJI]}, "input[1]", 1),
    ("embedding instruction tokens", "/v1/embeddings", {"input": ["a"], "instruction": EMOJI}, "instruction", None),
    (
        "rerank instruction tokens",
        "/v1/rerank",
        {"query": "a", "documents": ["b"], "instruction": EMOJI},
        "instruction",
        None,
    ),
    ("rerank query tokens", "/v1/rerank", {"query": EMOJI, "documents": ["b", "c"]}, "query", None),
    (
        "query + document tokens",
        "/v1/rerank",
        {"query": _words(2_900, 1), "documents": ["b", _words(2_900, 2)]},
        "documents[1]",
        1,
    ),
]


@pytest.mark.parametrize(("name", "route", "payload", "param", "index"), OVER_LIMITS, ids=[c[0] for c in OVER_LIMITS])
def test_over_a_text_or_token_limit_is_413_naming_the_field(client, name, route, payload, param, index):
    error = _assert_error(client.post(route, json=payload), 413, param, index)
    assert "tokens" in error["message"] or "characters" in error["message"]


def test_within_the_token_limit_counts_the_instruction_in_usage(client):
    plain = client.post("/v1/embeddings", json={"input": ["a red circle"]}).json()["usage"]["prompt_tokens"]
    instructed = client.post("/v1/embeddings", json={"input": ["a red circle"], "instruction": _words(600, 3)})
    assert instructed.status_code == 200, instructed.text
    assert instructed.json()["usage"]["prompt_tokens"] > plain + 100


# ------------------------------------------------------------------------------------------------------------
# Pixels: a budget per request, from the image headers, before decoding
# ------------------------------------------------------------------------------------------------------------
def test_request_pixel_budget_is_413_naming_it(client):
    within = {"input": [{"image": _png((200, 200))}, {"image": _png((200, 200))}]}  # 80,000 pixels
    assert client.post("/v1/embeddings", json=within).status_code == 200
    over = {"input": ["a", {"image": _png((200, 200))}, {"image": _png((200, 200))}, {"image": _png((200, 200))}]}
    error = _assert_error(client.post("/v1/embeddings", json=over), 413, "input[3].image", 3)
    assert "max_request_pixels" in error["message"] and str(REQUEST_PIXELS) in error["message"]
    rerank = {"query": {"image": _png((250, 250))}, "documents": ["a", {"image": _png((250, 250))}]}
    _assert_error(client.post("/v1/rerank", json=rerank), 413, "documents[1].image", 1)


def test_request_pixel_budget_is_checked_from_the_header_before_decoding(client):
    # Each image alone fits the per-image limit; the second is cut off after its header. Decoding it would fail
    # (400); refused from its header, it is a 413 for the budget.
    alone = {"input": [{"image": _truncated_png((250, 250))}]}
    _assert_error(client.post("/v1/embeddings", json=alone), 400, "input[0].image", 0)
    payload = {"input": [{"image": _png((250, 250))}, {"image": _truncated_png((250, 250))}]}
    error = _assert_error(client.post("/v1/embeddings", json=payload), 413, "input[1].image", 1)
    assert "max_request_pixels" in error["message"]


# ------------------------------------------------------------------------------------------------------------
# A large request runs in slices: a small one sent meanwhile does not wait for all of it
# ------------------------------------------------------------------------------------------------------------
def test_a_small_request_is_not_stuck_behind_a_large_one(server, client):
    # 160 documents, each pair near the token limit: one pair per batch, 160 batches. Without slicing the small
    # request would wait for all of them and finish after the large one.
    large = {"query": _words(2_000, 4), "documents": [_words(2_000, 10 + i) for i in range(160)]}
    small = {"query": "a red circle", "documents": ["a red circle", "a blue square"]}
    assert client.post("/v1/rerank", json=small).status_code == 200  # warm
    finished: dict[str, float] = {}

    def send_large() -> None:
        with server.client() as http:
            response = http.post("/v1/rerank", json=large)
        assert response.status_code == 200, response.text
        assert sorted(row["index"] for row in response.json()["results"]) == list(range(160))
        finished["large"] = time.monotonic()

    before = _reranker_batches(client)
    thread = threading.Thread(target=send_large)
    thread.start()
    deadline = time.monotonic() + 120
    while _reranker_batches(client) < before + 3 and time.monotonic() < deadline:  # its slices are running
        time.sleep(0.05)
    started = time.monotonic()
    response = client.post("/v1/rerank", json=small)
    finished["small"] = time.monotonic()
    thread.join(300)
    assert response.status_code == 200, response.text
    assert "large" in finished, "the large request did not finish"
    # The order, not absolute times: the small request was answered while the large one still ran, and took a
    # small share of the large one's remaining time.
    assert finished["small"] < finished["large"]
    assert finished["small"] - started < 0.5 * (finished["large"] - started)


def _reranker_batches(client: httpx.Client) -> float:
    from tests.serve.server_process import metric_value

    return metric_value(client.get("/metrics").text, "unime_batch_requests_count", 0.0, model=RERANKER_NAME)


def test_ready_route_reports_the_queue(client):
    body = client.get("/ready").json()
    assert body["status"] == "ready"
    assert set(body["models"]) == {"embedder", "reranker"}
    assert body["models"]["reranker"]["oldest_wait_s"] >= 0


# ------------------------------------------------------------------------------------------------------------
# Client mistakes: 4xx in the API's error shape, naming field and item; never internal text
# ------------------------------------------------------------------------------------------------------------
def _raw(client: httpx.Client, route: str, body: str) -> httpx.Response:
    return client.post(route, content=body.encode(), headers={"Content-Type": "application/json"})


def test_deeply_nested_json_is_400(client):
    _assert_error(_raw(client, "/v1/embeddings", "[" * 100_000 + "]" * 100_000), 400, "body", None)
    _assert_error(_raw(client, "/v1/embeddings", '{"input": ' + "[" * 100_000 + "]" * 100_000 + "}"), 400, "body", None)


@pytest.mark.parametrize(
    ("route", "template", "param"),
    [
        ("/v1/embeddings", '{"input": "a", "dimensions": %s}', "dimensions"),
        ("/v1/rerank", '{"query": "a", "documents": ["b"], "top_n": %s}', "top_n"),
        ("/v1/embeddings", '{"input": %s}', "input"),
    ],
)
def test_a_5000_digit_integer_is_400_naming_its_field(client, route, template, param):
    error = _assert_error(_raw(client, route, template % ("9" * 5000)), 400, param, None)
    assert "5000 digits" in error["message"]


SURROGATES = [
    ("/v1/embeddings", '{"input": ["a", "b\\ud800c"]}', "input[1]", 1),
    ("/v1/embeddings", '{"input": [{"text": "\\udfff"}]}', "input[0].text", 0),
    ("/v1/embeddings", '{"input": "a", "instruction": "\\ud800"}', "instruction", None),
    ("/v1/rerank", '{"query": "a", "documents": ["b", "c", "\\ud800"]}', "documents[2]", 2),
    ("/v1/rerank", '{"query": "\\ud83d", "documents": ["b"]}', "query", None),
]


@pytest.mark.parametrize(("route", "body", "param", "index"), SURROGATES, ids=[s[2] for s in SURROGATES])
def test_a_lone_surrogate_is_400_naming_field_and_item(client, route, body, param, index):
    error = _assert_error(_raw(client, route, body), 400, param, index)
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("size", [(1, 16_000), (4_000, 2)])
def test_an_extreme_aspect_ratio_is_400_naming_the_image(client, size):
    payload = {"input": ["a", {"text": "b", "image": _png(size)}]}
    error = _assert_error(client.post("/v1/embeddings", json=payload), 400, "input[1].image", 1)
    assert "aspect ratio" in error["message"]
    rerank = {"query": "a", "documents": [{"image": _png(size)}]}
    _assert_error(client.post("/v1/rerank", json=rerank), 400, "documents[0].image", 0)


def test_unknown_routes_and_wrong_methods_answer_in_the_error_shape(client):
    missing = client.get("/v1/nothing-here")
    _assert_error(missing, 404, "path", None)
    wrong = client.get("/v1/embeddings")
    _assert_error(wrong, 405, "method", None)
    assert "POST" in wrong.headers["Allow"]
    _assert_error(client.post("/health", json={}), 405, "method", None)


def test_the_server_still_serves_after_every_mistake(client):
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/v1/embeddings", json={"input": ["still works"], "model": EMBEDDER_NAME})
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------------------------
# A name for each hosted model
# ------------------------------------------------------------------------------------------------------------
def test_each_model_has_its_own_served_name(client):
    listed = {(m["id"], m["kind"]) for m in client.get("/v1/models").json()["data"]}
    assert listed == {(EMBEDDER_NAME, "embedder"), (RERANKER_NAME, "reranker")}
    embedded = client.post("/v1/embeddings", json={"input": "a", "model": EMBEDDER_NAME})
    assert embedded.status_code == 200 and embedded.json()["model"] == EMBEDDER_NAME
    reranked = client.post("/v1/rerank", json={"query": "a", "documents": ["b"], "model": RERANKER_NAME})
    assert reranked.status_code == 200 and reranked.json()["model"] == RERANKER_NAME
    # Each route takes its own model's name.
    error = _assert_error(
        client.post("/v1/rerank", json={"query": "a", "documents": ["b"], "model": EMBEDDER_NAME}), 404, "model", None
    )
    assert RERANKER_NAME in error["message"]
