"""A full queue answers 503 with Retry-After; SIGTERM under load finishes every request in flight, and the requests
that outlast the shutdown grace period get 503 with Retry-After while the server exits 0."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.serve.server_process import (
    assert_deadline_answers_503,
    assert_full_queue_answers_503,
    assert_graceful_stop_under_load,
    data_url,
    start_server,
    wait_in_flight,
)

MAX_QUEUE = 4


def server_args(serve_models) -> list[str]:
    """The module's server: the embedder alone, a queue of MAX_QUEUE, no batching, remote images allowed."""
    return [
        str(serve_models["embedder"]),
        "--backend",
        "transformers",
        "--max-queue",
        str(MAX_QUEUE),
        "--no-batching",
        "--allow-remote-images",
    ]


@pytest.fixture(scope="module")
def server(serve_models, tmp_path_factory):
    proc = start_server(server_args(serve_models), tmp_path_factory.mktemp("serve-logs") / "load.log", timeout=120)
    yield proc
    proc.stop()


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


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_image_formats_other_than_the_five_are_refused(server, fmt):
    payload = {"input": ["a", {"text": "b", "image": data_url(Image.new("RGB", (16, 16)), fmt)}]}
    response = httpx.post(f"{server.url}/v1/embeddings", json=payload, headers=server.headers, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["index"]) == ("input[1].image", 1)
    assert "PNG, JPEG, WebP, GIF or BMP" in error["message"]


def test_full_queue_answers_503_with_retry_after(server, heavy_items):
    assert_full_queue_answers_503(server, heavy_items, MAX_QUEUE)


@pytest.mark.slow  # starts a server of its own
def test_graceful_shutdown_finishes_requests_in_flight(serve_models, heavy_items, tmp_path):
    """A server of its own (stopping it leaves the module's running), configured as the module's.

    Requests of 32 image+text items, one client each: with batching off, about MAX_QUEUE of them are in the
    server at any moment, each waiting for the ones ahead, so several are in flight when SIGTERM lands.
    """
    server = start_server(server_args(serve_models), tmp_path / "stopped.log", timeout=120)
    try:
        assert_graceful_stop_under_load(server, heavy_items * 4, clients=MAX_QUEUE)
    finally:
        server.stop()


GRACE_S = 1.0


@pytest.mark.slow  # starts a server of its own
@pytest.mark.parametrize("http_workers", [0, 2], ids=["one-process", "http-workers"])
def test_requests_past_the_grace_period_get_503_and_the_server_exits_0(
    serve_models, heavy_items, tmp_path, http_workers
):
    """Six requests of 256 text+image items (a few seconds of model time) against a grace period of 1 s."""
    args = [str(serve_models["embedder"]), "--backend", "transformers", "--no-batching"]
    args += ["--shutdown-grace-s", str(GRACE_S), "--http-workers", str(http_workers)]
    server = start_server(args, tmp_path / "grace.log", timeout=180)
    try:
        assert_deadline_answers_503(server, heavy_items * 32, clients=6, grace_s=GRACE_S)
    finally:
        server.stop()


@pytest.mark.slow  # starts a server of its own
def test_a_second_signal_stops_at_once_and_exits_0(serve_models, heavy_items, tmp_path):
    """Two requests of 256 items in flight, SIGINT twice: the server stops without waiting for the model."""
    args = [str(serve_models["embedder"]), "--backend", "transformers", "--no-batching", "--shutdown-grace-s", "30"]
    server = start_server(args, tmp_path / "forced.log", timeout=180)
    try:
        with ThreadPoolExecutor(2) as pool:
            pending = [
                pool.submit(
                    httpx.post,
                    f"{server.url}/v1/embeddings",
                    json={"input": heavy_items * 32},
                    headers=server.headers,
                    timeout=120,
                )
                for _ in range(2)
            ]
            wait_in_flight(server, 2)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGINT)
            time.sleep(0.3)
            server.process.send_signal(signal.SIGINT)
            status = server.process.wait(timeout=60)
            exited = time.monotonic() - signalled
            for future in pending:
                with contextlib.suppress(httpx.HTTPError):
                    future.result()
        log = server.log()
        assert status == 0, log
        assert "terminate called" not in log and "stopped (forced" in log, log
        assert exited < 10, f"{exited:.1f} s to stop after the second signal"
    finally:
        server.stop()


@pytest.mark.slow  # starts server processes
@pytest.mark.parametrize("workers", [[], ["--http-workers", "1"]], ids=["one-process", "http-workers"])
def test_a_port_in_use_is_refused_before_the_models_load(serve_models, workers):
    """The HTTP socket is bound first (an engine picking free ports while it loads cannot take it): a port already
    in use is exit 2 naming it, without loading a model and without a stack trace."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "unime.cli", "serve", str(serve_models["embedder"]), "--backend"]
        command += ["transformers", "--host", "127.0.0.1", "--port", str(port), *workers]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Loading weights" not in done.stderr, done.stderr
