"""Prometheus metrics of one server process: requests, latency, batch sizes, queue depth, errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The server's metrics, in a registry of its own (several servers can live in one test process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("unime_requests", "HTTP requests answered", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "unime_request_latency_seconds",
            "Time from request to response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "unime_errors", "Requests answered with an error", ["route", "type"], registry=self.registry
        )
        self.batch_items = Histogram(
            "unime_batch_items",
            "Inputs (or pairs) per model batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "unime_batch_requests",
            "Requests merged into one model batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("unime_queue_depth", "Requests waiting for a model", ["model"], registry=self.registry)
        self.in_flight = Gauge("unime_requests_in_flight", "Requests being handled", registry=self.registry)
        self.items = Counter("unime_items", "Inputs embedded or documents scored", ["route"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
