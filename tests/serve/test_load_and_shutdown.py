"""A full queue answers 503 with Retry-After; SIGTERM under load finishes every request in flight."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.server_process import data_url, start_server

MAX_QUEUE = 4


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-logs") / "load.log"
    args = [
        str(serve_models["embedder"]),
        "--backend",
        "transformers",
        "--max-queue",
        str(MAX_QUEUE),
        "--no-batching",
        "--allow-remote-images",
    ]
    proc = start_server(args, log, timeout=120)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def heavy_items(serve_inputs):
    images, captions = serve_inputs
    return [{"text": captions[i % 4], "image": data_url(images[i % 4])} for i in range(8)]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/health",
        "http://localhost:{port}/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/x.png",
        "http://192.168.0.1/x.png",
        "http://[::1]/x.png",
        "http://0.0.0.0/x.png",
    ],
)
def test_remote_images_never_reach_private_addresses(server, url):
    payload = {"input": ["a", {"image": url.format(port=server.port)}]}
    response = httpx.post(f"{server.url}/v1/embeddings", json=payload, headers=server.headers, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["index"]) == ("input[1].image", 1)
    assert "non-public" in error["message"]


def test_full_queue_answers_503_with_retry_after(server, heavy_items):
    def one(_: int) -> httpx.Response:
        return httpx.post(
            f"{server.url}/v1/embeddings", json={"input": heavy_items}, headers=server.headers, timeout=120
        )

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [response for response in responses if response.status_code == 503]
    assert refused, "32 concurrent requests never filled a queue of 4"
    assert all(response.headers["Retry-After"] == "1" for response in refused)
    assert all(response.json()["error"]["type"] == "server_overloaded" for response in refused)
    assert all(len(response.json()["data"]) == 8 for response in responses if response.status_code == 200)
    assert statuses.count(200) >= MAX_QUEUE
    # Still healthy, and the queue drained.
    health = httpx.get(f"{server.url}/health", headers=server.headers).json()
    assert health["status"] == "ok" and health["models"]["embedder"]["queue"] == 0
    ok = httpx.post(f"{server.url}/v1/embeddings", json={"input": heavy_items}, headers=server.headers, timeout=120)
    assert ok.status_code == 200


def test_graceful_shutdown_finishes_requests_in_flight(server, heavy_items):
    """Runs last in this module: it stops the server."""
    stop = threading.Event()
    warmed = threading.Barrier(MAX_QUEUE + 1)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    # Requests of 32 image+text items, one client each: with batching off, about MAX_QUEUE of them are in the
    # server at any moment, each waiting for the ones ahead, so several are in flight when SIGTERM lands.
    items = heavy_items * 4

    def client_loop() -> None:
        with server.client() as http:
            first = True
            while not stop.is_set():
                try:
                    response = http.post("/v1/embeddings", json={"input": items})
                    outcome = str(response.status_code) if len(response.json().get("data", [])) == 32 else "short"
                except httpx.HTTPError as err:  # a request sent but never answered: lost
                    outcome = f"lost: {err!r}"
                with lock:
                    outcomes.append((outcome, time.monotonic()))
                if first:
                    first = False
                    warmed.wait(timeout=120)

    threads = [threading.Thread(target=client_loop) for _ in range(MAX_QUEUE)]
    for thread in threads:
        thread.start()
    warmed.wait(timeout=120)  # every client has had one answer: the server is under load
    stop.set()  # no new requests from here on; those already sent must all be answered
    time.sleep(0.05)
    killed_at = time.monotonic()
    server.terminate()
    for thread in threads:
        thread.join(timeout=120)
    assert server.process.wait(timeout=60) == 0, server.log()
    assert outcomes and all(outcome == "200" for outcome, _ in outcomes), outcomes
    assert any(finished > killed_at for _, finished in outcomes), "no request was in flight at SIGTERM"
    assert "unime serve: stopped" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", headers=server.headers)
