"""Start `unime serve` as a real subprocess on a free loopback port, and talk to it."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

API_KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64,{b64_image(image, fmt)}"


def b64_image(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class ServerProcess:
    """`unime serve ...` in a subprocess; its output goes to a log file that failures print."""

    def __init__(
        self, args: list[str], log_path: Path, *, env: dict[str, str | None] | None = None, api_key: str = API_KEY
    ):
        """`env` is added to this process's environment; a None value removes the variable."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        command = [sys.executable, "-m", "unime.cli", "serve", *args, "--port", str(self.port), "--api-key", api_key]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        full_env = {name: value for name, value in full_env.items() if value is not None}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", headers=self.headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-6000:]

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def model_args(models: dict[str, Path], *, reranker: bool = True, backend: str = "transformers") -> list[str]:
    """`unime serve`'s arguments for the test models (`serve_models`): the embedder, and the reranker."""
    args = [str(models["embedder"])]
    if reranker:
        args += ["--reranker", str(models["reranker"])]
    return [*args, "--backend", backend]


def start_server(args: list[str], log_path: Path, *, timeout: float, env: dict[str, str | None] | None = None):
    server = ServerProcess(args, log_path, env=env)
    server.wait_ready(timeout)
    return server


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def embed(client: httpx.Client, payload: dict) -> np.ndarray:
    """The vectors of a 200 answer, checked for order and usage."""
    response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [row["index"] for row in body["data"]] == list(range(len(body["data"])))
    assert body["usage"]["prompt_tokens"] > 0
    return np.array([row["embedding"] for row in body["data"]], dtype=np.float32)


def metric_value(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """One sample of a Prometheus text exposition (`default` where it is absent, else an error)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    if default is not None:
        return default
    raise AssertionError(f"{name}{labels} is not in the metrics")


def assert_full_queue_answers_503(server: ServerProcess, items: list, max_queue: int) -> None:
    """32 concurrent requests of `items` against a queue of `max_queue`: 200s and 503s with Retry-After only."""

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/embeddings", json={"input": items}, headers=server.headers, timeout=120)

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 503}, statuses
    refused = [response for response in responses if response.status_code == 503]
    assert refused, f"32 concurrent requests never filled a queue of {max_queue}"
    assert all(response.headers["Retry-After"] == "1" for response in refused)
    assert all(response.json()["error"]["type"] == "server_overloaded" for response in refused)
    assert all(len(response.json()["data"]) == len(items) for response in responses if response.status_code == 200)
    assert statuses.count(200) >= max_queue
    # Still healthy, and the queue drained.
    health = httpx.get(f"{server.url}/health", headers=server.headers).json()
    assert health["status"] == "ok" and health["models"]["embedder"]["queue"] == 0
    ok = httpx.post(f"{server.url}/v1/embeddings", json={"input": items}, headers=server.headers, timeout=120)
    assert ok.status_code == 200


def assert_graceful_stop_under_load(server: ServerProcess, items: list, clients: int) -> None:
    """SIGTERM while `clients` loops send requests of `items`: every request sent is answered 200, exit 0."""
    stop = threading.Event()
    warmed = threading.Barrier(clients + 1)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def client_loop() -> None:
        with server.client() as http:
            first = True
            while not stop.is_set():
                try:
                    response = http.post("/v1/embeddings", json={"input": items})
                    ok = len(response.json().get("data", [])) == len(items)
                    outcome = str(response.status_code) if ok else "short"
                except httpx.HTTPError as err:  # a request sent but never answered: lost
                    outcome = f"lost: {err!r}"
                with lock:
                    outcomes.append((outcome, time.monotonic()))
                if first:
                    first = False
                    warmed.wait(timeout=120)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    warmed.wait(timeout=120)  # every client has had one answer: the server is under load
    # Past the barrier the clients send again: wait until the server holds their requests (all but one at least),
    # or the stop could find none in flight.
    wait_in_flight(server, clients - 1)
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
    try:
        httpx.get(f"{server.url}/health", headers=server.headers)
    except httpx.ConnectError:
        return
    raise AssertionError("the server still accepts connections after it stopped")


def assert_deadline_answers_503(server: ServerProcess, items: list, clients: int, grace_s: float) -> None:
    """SIGTERM while `clients` requests of `items` are in the server, more than it can finish in `grace_s`.

    Requests finished within the grace period are answered 200; the others 503 with Retry-After once it is over
    (not before); the process then exits 0 without waiting for the model, and without an abort.
    """
    outcomes: list[tuple[httpx.Response | str, float]] = []
    lock = threading.Lock()
    connected = threading.Barrier(clients + 1)

    def client() -> None:
        with server.client() as http:
            http.get("/health")  # the connection is accepted before the stop: the request cannot be refused
            connected.wait(timeout=60)
            try:
                outcome: httpx.Response | str = http.post("/v1/embeddings", json={"input": items})
            except httpx.HTTPError as err:  # sent and never answered
                outcome = f"lost: {err!r}"
            with lock:
                outcomes.append((outcome, time.monotonic()))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    connected.wait(timeout=60)
    wait_in_flight(server, clients)
    signalled = time.monotonic()
    server.terminate()
    for thread in threads:
        thread.join(timeout=120)
    status = server.process.wait(timeout=60)
    exited = time.monotonic() - signalled
    log = server.log()
    assert status == 0, log
    assert "terminate called" not in log and "Traceback" not in log, log
    assert "unime serve: stopped" in log, log
    lost = [outcome for outcome, _ in outcomes if isinstance(outcome, str)]
    assert len(outcomes) == clients and not lost, (lost, log)
    statuses = [outcome.status_code for outcome, _ in outcomes]
    assert set(statuses) <= {200, 503}, [outcome.text for outcome, _ in outcomes]
    late = [(outcome, at - signalled) for outcome, at in outcomes if outcome.status_code == 503]
    assert late, f"every request finished within the {grace_s} s grace period: make them slower ({statuses})"
    for response, after in late:
        assert response.headers["Retry-After"] == "1"
        error = response.json()["error"]
        assert (error["code"], error["type"]) == (503, "server_overloaded")
        assert "grace period" in error["message"]
        assert after >= grace_s * 0.9, f"answered 503 {after:.2f} s after the signal, before the grace period ended"
    assert exited < grace_s + 10, f"the server took {exited:.1f} s to exit after the grace period of {grace_s} s"


def wait_in_flight(server: ServerProcess, count: int, timeout: float = 60) -> None:
    """Wait until the server holds at least `count` requests (its guard counts them as they arrive)."""
    deadline = time.monotonic() + timeout
    # The /metrics request asking counts itself.
    while metric_value(_metrics(server), "unime_requests_in_flight", 0.0) < count + 1:
        assert time.monotonic() < deadline, f"{count} requests never were in the server at once"
        time.sleep(0.01)


def _metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=30).text
