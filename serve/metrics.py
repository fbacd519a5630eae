"""Prometheus metrics of one server: requests, latency, batch sizes, queue depth, errors.

One process keeps them in a registry of its own. A server with HTTP worker processes (`--http-workers`) uses
prometheus_client's multiprocess mode instead: every process of that server writes its values to files in one
private directory, and `/metrics`, whichever worker answers it, adds them up (requests, latency and errors
from every worker; batch sizes and queue depth from the model process).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def share_metrics_in(directory: str) -> None:
    """Keep this process's metric values in `directory`, shared with the other processes of its server.

    Call it before the process makes its `ServerMetrics`; processes spawned afterwards inherit the setting.
    prometheus_client picks its value class when it is imported, so a process that imported it earlier is
    switched here as well.
    """
    os.environ[MULTIPROC_ENV] = directory
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def forget_process(pid: int) -> None:
    """A server process has exited: drop its live gauges (requests in flight); its counters still count."""
    mark_process_dead(pid, os.environ[MULTIPROC_ENV])


class ServerMetrics:
    """The server's metrics, in a registry of its own (several servers can live in one test process), or
    shared between the processes of one server (`share_metrics_in`)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.shared_dir = os.environ.get(MULTIPROC_ENV) if getattr(values.ValueClass, "_multiprocess", False) else None
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
        # Shared: the sum over the live processes (only the model process sets the queue depth).
        self.queue_depth = Gauge(
            "unime_queue_depth",
            "Requests waiting for a model",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            "unime_requests_in_flight", "Requests being handled", registry=self.registry, multiprocess_mode="livesum"
        )
        self.items = Counter("unime_items", "Inputs embedded or documents scored", ["route"], registry=self.registry)

    def render(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.shared_dir)
        return generate_latest(registry)
