"""The models a server hosts: each behind the queue (batcher) that gathers its requests into batches."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from unime.serve.backends import BatchResult, EmbedderBackend, RerankerBackend
from unime.serve.config import ServeConfig
from unime.serve.metrics import ServerMetrics
from unime.serve.micro_batching import MicroBatcher


class Batcher(Protocol):
    """What the routes need from the queue in front of a model.

    In one process it is the model's `MicroBatcher`; in an HTTP worker process (`--http-workers`) it is a
    `unime.serve.workers.RemoteBatcher`, which forwards each request to the model process's batcher.
    """

    @property
    def depth(self) -> int:
        """Requests waiting for the model."""
        ...

    @property
    def oldest_wait_s(self) -> float:
        """Seconds the longest-waiting queued request has waited for the model (readiness)."""
        ...

    def arriving(self) -> contextlib.AbstractContextManager:
        """Announce a request whose body is in and that is being decoded, until it is queued."""
        ...

    def enqueue(self, inputs: list[Any], instructions: list[str | None], costs: list[int]) -> asyncio.Future:
        """Queue a request (`costs`: each input's tokens); its future gets its `BatchResult` (or the error)."""
        ...

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests; finish the queued ones."""
        ...


@dataclass
class HostedModel:
    """A model the server hosts: its public name, its backend and the batcher in front of it.

    `backend` is the backend itself, or in an HTTP worker a description of it (`workers.BackendInfo`): the
    routes read only its `name`, `dimension`, `normalize`, `matryoshka_dims`, `multi_vector_dim`, `single_vector` and
    `instruction_for`.
    """

    name: str
    kind: str
    backend: Any
    batcher: Batcher


def split_batch(result: BatchResult, sizes: list[int]) -> list[BatchResult]:
    parts, start = [], 0
    for size in sizes:
        stop = start + size
        matrices = result.matrices[start:stop] if result.matrices is not None else None
        parts.append(BatchResult(values=result.values[start:stop], tokens=result.tokens[start:stop], matrices=matrices))
        start = stop
    return parts


def join_batches(parts: list[BatchResult]) -> BatchResult:
    """The results of a request's slices (`MicroBatcher`), back in one."""
    matrices = None
    if any(part.matrices is not None for part in parts):
        # A slice whose batch asked for no token vectors has none: its inputs are plain ones.
        matrices = [m for part in parts for m in (part.matrices or [None] * len(part.tokens))]
    return BatchResult(
        values=np.concatenate([part.values for part in parts]),
        tokens=[n for part in parts for n in part.tokens],
        matrices=matrices,
    )


def host_models(
    config: ServeConfig,
    metrics: ServerMetrics,
    *,
    embedder: EmbedderBackend | None,
    reranker: RerankerBackend | None,
    embedder_name: str | None,
    reranker_name: str | None,
    observe_queue: Callable[[str, int], None] = lambda kind, depth: None,
) -> dict[str, HostedModel]:
    """The loaded models, each behind its own `MicroBatcher` (whose worker thread runs its batches).

    `observe_queue(kind, depth)` is told each new queue depth, beside the metrics.
    """

    def batcher_for(name: str, kind: str, run: Any) -> MicroBatcher:
        def queue_changed(depth: int) -> None:
            metrics.queue_depth.labels(name).set(depth)
            observe_queue(kind, depth)

        return MicroBatcher(
            name,
            run,
            split_batch,
            join=join_batches,
            max_queue=config.max_queue,
            max_batch_items=config.max_batch_items,
            max_batch_tokens=config.max_batch_tokens,
            wait_ms=config.batch_wait_ms,
            arriving_wait_ms=config.batch_wait_arriving_ms,
            batching=config.batching,
            retry_after_s=config.retry_after_s,
            observe_batch=lambda items, requests: (
                metrics.batch_items.labels(name).observe(items),
                metrics.batch_requests.labels(name).observe(requests),
            ),
            observe_queue=queue_changed,
        )

    hosted: dict[str, HostedModel] = {}
    if embedder is not None and embedder_name is not None:
        hosted["embedder"] = HostedModel(
            embedder_name, "embedder", embedder, batcher_for(embedder_name, "embedder", embedder.embed)
        )
    if reranker is not None and reranker_name is not None:
        hosted["reranker"] = HostedModel(
            reranker_name, "reranker", reranker, batcher_for(reranker_name, "reranker", reranker.score)
        )
    return hosted


def hosted_names(config: ServeConfig) -> tuple[str | None, str | None]:
    """Public names of the embedder and the reranker: the served names, else the directories' names.

    `served_model_name` names the embedder (the reranker when it is hosted alone), `reranker_served_model_name`
    the reranker.
    """

    def name(directory: str | None) -> str | None:
        return Path(directory).resolve().name if directory else None

    embedder, reranker = name(config.embedder_dir), name(config.reranker_dir)
    if config.served_model_name:
        if embedder is not None:
            embedder = config.served_model_name
        else:
            reranker = config.served_model_name
    if config.reranker_served_model_name:
        reranker = config.reranker_served_model_name
    return embedder, reranker


__all__: Sequence[str] = ("Batcher", "HostedModel", "host_models", "hosted_names", "join_batches", "split_batch")
