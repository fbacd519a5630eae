"""The app in process, with a real micro-batcher in front of a controllable model: readiness flips while a request
waits too long, and an unexpected failure is answered 500 with a fixed message (the details go to the log)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from fastapi.testclient import TestClient

from unime.serve.app import INTERNAL_ERROR, create_app
from unime.serve.backends import BatchResult
from unime.serve.config import ServeConfig
from unime.serve.hosting import HostedModel, join_batches, split_batch
from unime.serve.metrics import ServerMetrics
from unime.serve.micro_batching import MicroBatcher


@dataclass
class HeldModel:
    """An embedder whose batches wait for `release`, and fail with an internal message when `fail` is set."""

    name: str = "held"
    dimension: int = 4
    normalize: bool = False

    def __post_init__(self) -> None:
        self.release = threading.Event()
        self.fail = False

    def instruction_for(self, input_type: str | None) -> str | None:
        return None

    def embed(self, items, instructions) -> BatchResult:
        self.release.wait(30)
        if self.fail:
            raise RuntimeError("secret internal detail of the model weights")
        return BatchResult(values=np.ones((len(items), 4), dtype=np.float32), tokens=[1] * len(items))


@pytest.fixture()
def app_and_model(serve_models):
    config = ServeConfig(embedder_dir=str(serve_models["embedder"]), max_queue_wait_s=0.2)
    model = HeldModel()
    batcher = MicroBatcher(
        "held", model.embed, split_batch, join=join_batches, max_queue=8, max_batch_items=1, max_batch_tokens=10_000,
        wait_ms=0, batching=True, retry_after_s=1,
    )  # fmt: skip
    hosted = {"embedder": HostedModel("held", "embedder", model, batcher)}
    yield create_app(config, hosted, ServerMetrics()), model
    model.release.set()
    batcher.close(5)


def test_ready_flips_while_a_queued_request_waits_longer_than_the_bound(app_and_model):
    app, model = app_and_model
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200
        answers = []
        senders = [
            threading.Thread(target=lambda: answers.append(client.post("/v1/embeddings", json={"input": "a"})))
            for _ in range(2)
        ]
        for sender in senders:  # one request runs (held), the other waits in the queue
            sender.start()
        deadline = time.monotonic() + 30
        while (not_ready := client.get("/ready")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not_ready.status_code == 503, not_ready.text
        body = not_ready.json()
        assert body["status"] == "not ready" and body["error"]["code"] == 503
        assert "max_queue_wait_s" in body["error"]["message"] and not_ready.headers["Retry-After"] == "1"
        assert body["models"]["embedder"]["oldest_wait_s"] > 0.2
        model.release.set()
        for sender in senders:
            sender.join(30)
        assert [answer.status_code for answer in answers] == [200, 200]
        assert client.get("/ready").status_code == 200


def test_an_internal_failure_is_a_500_with_a_fixed_message(app_and_model, caplog):
    app, model = app_and_model
    model.fail = True
    model.release.set()
    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level("ERROR", logger="unime.serve"):
        response = client.post("/v1/embeddings", json={"input": "a"})
    assert response.status_code == 500
    assert response.json() == {
        "error": {"message": INTERNAL_ERROR, "type": "server_error", "param": None, "index": None, "code": 500}
    }
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert "secret internal detail" in caplog.text  # the operator still sees what happened
