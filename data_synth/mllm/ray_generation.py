"""MLLM generation on a Ray cluster (`unime generate --engine ray`): the requests of a run go to an actor pool.

Each actor of the pool (`unime.ray_engine.map_records`: a Ray Data actor pool, `ray.num_workers` actors) builds its
backend ONCE (`GenerationWorker`): a vLLM engine in the actor's process (`vllm_worker.Engine`; on GPU nodes with
`ray.gpus_per_worker`, e.g. 1 per engine, or `vllm.tensor_parallel_size` for an engine over several GPUs), or an
OpenAI-compatible client (`OpenAIBackend`, `openai.concurrency` requests in flight per actor). It then answers
block after block of requests (`ray.batch_size` each): it reads each block's photos itself (`backend.read_request`:
the same data URL and messages as a local run), generates, and sends the results back.

This process (the driver) sends the prompts and the photos' paths, not the photos, so every worker must see the
image folder at the same absolute path (one machine, or a shared file system). It receives the results block by
block, in request order, and writes them through the same pipeline as the local run (`generate.generate_dataset`:
checks, rejections, near-duplicates, `ShardedJsonlWriter` and its manifest), so a run on Ray writes the rows a
local run writes, and either resumes the other's folder. Resumable as the local run is: what the driver wrote
stays, and a rerun sends only the photos not yet recorded. Ray delivers a block once, after its task finished,
even when it restarted a dead actor and retried the block (`ray.max_restarts`), so no record is written twice.
Ray Data shows the job's progress.

Failures are the local run's: an endpoint's errors, a dead engine, or a photo the worker cannot read
(`photo_unreadable_on_worker`) are counted in the manifest's `details.last_run.failed` and retried by the next run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from unime.data_synth.mllm.backend import GenerationRequest, GenerationResult, PhotoRequest, read_request
from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig
from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig, engine_result
from unime.data_synth.mllm.vllm_worker import Engine
from unime.errors import ConfigError
from unime.ray_engine import RaySettings, Worker, map_records

UNREADABLE_ON_WORKER = "photo_unreadable_on_worker"
"""The failure of a request whose photo the worker could not read (the driver could, moments before)."""


@dataclass
class GenerationWorker:
    """Builds one actor's backend (a `ray_engine.WorkerFactory`): picklable, it holds settings, not a model."""

    backend: Literal["vllm", "openai"]
    """Which backend each actor builds."""
    openai: OpenAIBackendConfig = field(default_factory=OpenAIBackendConfig)
    """The OpenAI-compatible backend's settings (with `backend: openai`)."""
    vllm: VllmBackendConfig = field(default_factory=VllmBackendConfig)
    """The vLLM backend's settings (with `backend: vllm`)."""
    seed: int = 0
    """The run's seed (vLLM: each request's sampling seed comes from it and the request's key)."""
    schema: dict[str, Any] = field(default_factory=dict)
    """The answer's JSON schema (set by `RayBackend` for its run)."""
    max_side: int = 1024
    """Photos are downscaled to this longer side before they are sent (set by `RayBackend`)."""

    def __post_init__(self) -> None:
        if self.backend == "vllm" and self.vllm.data_parallel_size != 1:
            raise ConfigError(
                f"vllm.data_parallel_size={self.vllm.data_parallel_size} with engine ray: the pool's actors are the "
                "engines (ray.num_workers, each with ray.gpus_per_worker GPUs); set vllm.data_parallel_size to 1"
            )

    def model_name(self) -> str:
        """The model's name as a local run records it (so that either engine resumes the other's folder)."""
        return self._local_backend().name

    def _local_backend(self) -> OpenAIBackend | VllmBackend:
        if self.backend == "openai":
            return OpenAIBackend(self.openai)
        return VllmBackend(self.vllm, seed=self.seed)

    def __call__(self) -> Worker:
        generate = self._build()

        def work(records: list[dict[str, Any]]) -> list[str]:
            requests, results = [], {}
            for record in records:
                try:
                    requests.append(read_request(PhotoRequest(**record), self.max_side))
                except OSError:
                    results[record["key"]] = GenerationResult(record["key"], failure=UNREADABLE_ON_WORKER)
            for result in generate(requests):
                results[result.key] = result
            return [
                json.dumps(asdict(results.get(record["key"]) or GenerationResult(record["key"], failure="no_result")))
                for record in records
            ]

        return work

    def _build(self) -> Callable[[list[GenerationRequest]], Iterable[GenerationResult]]:
        """The actor's backend, built once: a function from requests to their results."""
        if self.backend == "openai":
            client = OpenAIBackend(self.openai)
            return lambda requests: client.generate(requests, self.schema)
        return _VllmInActor(self._local_backend(), self.schema)


class _VllmInActor:
    """A vLLM engine started once in the actor's own process (on a GPU node, on the GPUs Ray gave the actor)."""

    def __init__(self, backend: VllmBackend, schema: dict[str, Any]):
        if backend.config.single_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read by vLLM when the engine starts
        self.backend = backend
        self.engine = Engine(backend.engine_job(schema))  # imports vLLM and starts the engine

    def __call__(self, requests: list[GenerationRequest]) -> Iterator[GenerationResult]:
        for raw in self.engine.generate([self.backend.engine_request(request) for request in requests]):
            yield engine_result(raw)


class RayBackend:
    """Generation on the connected Ray cluster (inside `ray_engine.ray_cluster`): a `backend.PhotoBackend`."""

    def __init__(self, worker: GenerationWorker, settings: RaySettings):
        self.worker = worker
        self.settings = settings
        self.name = worker.model_name()

    def generate_photos(
        self, requests: Sequence[PhotoRequest], schema: dict[str, Any], max_side: int
    ) -> Iterator[GenerationResult]:
        make_worker = replace(self.worker, schema=schema, max_side=max_side)
        for _, outputs in map_records([asdict(request) for request in requests], make_worker, self.settings):
            for output in outputs:  # the block's results, in request order
                yield GenerationResult(**json.loads(str(output)))
