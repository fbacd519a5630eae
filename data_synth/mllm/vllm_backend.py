"""A vLLM engine on a local model, offline and batched, in child processes; data-parallel over devices.

Data parallelism here is `data_parallel_size` independent engines, one per group of
`tensor_parallel_size` devices, each generating every n-th request (see `vllm_worker.rank_slice`). vLLM's
own offline data-parallel mode (VLLM_DP_* variables) refuses dense models ("Offline data parallel mode is
not supported/useful for dense models", vllm/config/parallel.py), and dense models are what generators are,
so independent engines are how a node's GPUs split one job. Across nodes, `--engine ray` runs one engine per actor of
a Ray cluster (`ray_generation`); `--shard i/N` remains for nodes that share no Ray cluster.

The engines run in child processes and are judged by the results they write: requests that have no result
when every engine has exited come back as failures ("engine_exited"), and the next run retries them.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unime.atomic import write_jsonl_atomic
from unime.data_synth.mllm.backend import GenerationRequest, GenerationResult
from unime.data_synth.mllm.vllm_worker import END_OF_REQUESTS, chunk_name
from unime.data_synth.sharding import stable_hash
from unime.errors import ConfigError
from unime.vllm_compat import engine_memory_kwargs

MEMORY_SETTINGS = ("gpu_memory_utilization", "extra_engine_args.kv_cache_memory_bytes")
"""The settings that size the engine's memory, named in its errors."""


@dataclass(frozen=True)
class VllmBackendConfig:
    """Settings of the vLLM backend."""

    model: str = ""
    """A local model directory (or a name vLLM resolves); required."""
    data_parallel_size: int = 1
    """Independent engines, each generating every n-th request."""
    tensor_parallel_size: int = 1
    """Devices per engine; engine r gets devices r*tp .. r*tp+tp-1 through CUDA_VISIBLE_DEVICES."""
    batch_size: int = 64
    """Requests per `LLM.chat` call; results are written after each."""
    stage_size: int = 1024
    """Requests per staged chunk file (photos as data URLs): the disk holds about two chunks at a time."""
    max_tokens: int = 1024
    """Answer length limit."""
    temperature: float = 0.7
    """Sampling temperature (each request is seeded from the run's seed and its key)."""
    max_model_len: int = 8192
    """Context length of the engine."""
    structured_output: bool = True
    """Constrain decoding to the answer's JSON schema (vLLM structured outputs); answers are checked anyway."""
    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile (faster start, slower generation; use on CPU and in tests)."""
    single_process: bool = False
    """Run the engine inside its worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor "uni"): one
    vLLM import instead of three, which is most of the start-up time on a small CPU machine."""
    chat_template: str | None = None
    """A Jinja chat template file to use instead of the model's own."""
    gpu_memory_utilization: float | None = None
    """Fraction of each GPU's memory the engine may take (None: vLLM's default on a GPU; on CPU, where vLLM reads it
    as a share of all memory, a KV cache sized from the memory available, as `unime.vllm_compat.
    engine_memory_kwargs` chooses, unless `extra_engine_args` gives `kv_cache_memory_bytes`)."""
    extra_engine_args: dict[str, int | float | bool | str] = field(default_factory=dict)
    """Further keyword arguments for `vllm.LLM`."""

    def __post_init__(self) -> None:
        if min(self.data_parallel_size, self.tensor_parallel_size, self.batch_size, self.stage_size) < 1:
            raise ConfigError("data_parallel_size, tensor_parallel_size, batch_size and stage_size must be >= 1")
        if self.stage_size < self.data_parallel_size:
            # Every engine must read every chunk before it is answered and deleted: each needs a share.
            raise ConfigError(
                f"stage_size ({self.stage_size}) must be >= data_parallel_size ({self.data_parallel_size})"
            )
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ConfigError(f"chat template {self.chat_template!r} does not exist")


class VllmBackend:
    """Generate with vLLM engines in child processes."""

    def __init__(self, config: VllmBackendConfig, *, work_dir: str | os.PathLike | None = None, seed: int = 0):
        if not config.model:
            raise ConfigError("the vLLM backend needs a model (--vllm.model)")
        self.config = config
        self.seed = seed
        """The run's seed: the engines' seed, and with each request's key its sampling seed."""
        self.name = Path(config.model).name if Path(config.model).exists() else config.model
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.returncodes: list[int] = []
        """Exit codes of the last run's engines (informational: results decide, not exit codes)."""

    def _engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "max_model_len": self.config.max_model_len,
            "enforce_eager": self.config.enforce_eager,
            "seed": self.seed,
            "limit_mm_per_prompt": {"image": 1, "video": 0},
        }
        if "kv_cache_memory_bytes" not in self.config.extra_engine_args:
            # The server's choice (`unime serve`): vLLM's CPU default reserves 92% of all memory and refuses to
            # start beside other work. Checked here, before any engine starts, so that a setting that cannot fit
            # fails with a message naming it rather than in the engine's process.
            args.update(engine_memory_kwargs(self.config.gpu_memory_utilization, flags=MEMORY_SETTINGS))
        elif self.config.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = self.config.gpu_memory_utilization
        args.update(self.config.extra_engine_args)
        return args

    def generate(self, requests: Iterable[GenerationRequest], schema: dict[str, Any]) -> Iterator[GenerationResult]:
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".vllm-job-", dir=self.work_dir) as tmp:
            yield from self._generate_in(Path(tmp), requests, schema)

    def engine_job(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The engine's and the sampling's settings (`vllm_worker.Engine`)."""
        return {
            "model": self.config.model,
            "engine": self._engine_args(),
            "single_process": self.config.single_process,
            "schema": schema,
            "structured_output": self.config.structured_output,
            "chat_template": self.config.chat_template,
            "batch_size": self.config.batch_size,
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }

    def engine_request(self, request: GenerationRequest) -> dict[str, Any]:
        """A request as the engine takes it, seeded from the run's seed and its key (the same answer whatever
        batch or engine it lands in)."""
        return {
            "key": request.key,
            "messages": request.messages,
            "seed": stable_hash(f"{self.seed}:{request.key}") % 2**31,
        }

    def _start_engine(self, tmp: Path, rank: int, world: int, schema: dict[str, Any]) -> subprocess.Popen:
        results_path = tmp / f"results-{rank}.jsonl"
        results_path.touch()
        job = {
            **self.engine_job(schema),
            "requests_dir": str(tmp),
            "results": str(results_path),
            "rank": rank,
            "world": world,
        }
        job_path = tmp / f"job-{rank}.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        env = dict(os.environ)
        if self.config.data_parallel_size > 1:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(_devices_of(rank, self.config.tensor_parallel_size, env))
        if self.config.single_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with (tmp / f"engine-{rank}.log").open("w", encoding="utf-8") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "unime.data_synth.mllm.vllm_worker", str(job_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def _generate_in(
        self, tmp: Path, requests: Iterable[GenerationRequest], schema: dict[str, Any]
    ) -> Iterator[GenerationResult]:
        # Requests (photos as data URLs) are staged in chunk files, one chunk ahead of the engines, and each
        # chunk is deleted once answered: the disk holds about two chunks, not the whole job.
        iterator = iter(requests)
        stage = self.config.stage_size
        chunks: list[list[str]] = []  # keys of each chunk written
        first = list(itertools.islice(iterator, stage))
        if not first:
            return
        exhausted = len(first) < stage

        def write_chunk(batch: list[GenerationRequest]) -> None:
            write_jsonl_atomic(
                tmp / chunk_name(len(chunks)), map(self.engine_request, batch)
            )  # the engine never sees half a chunk
            chunks.append([r.key for r in batch])

        write_chunk(first)
        if exhausted:
            (tmp / END_OF_REQUESTS).touch()
        world = min(self.config.data_parallel_size, len(first)) if exhausted else self.config.data_parallel_size
        processes = [self._start_engine(tmp, rank, world, schema) for rank in range(world)]
        readers = [_LineReader(tmp / f"results-{rank}.jsonl") for rank in range(world)]
        returned: set[str] = set()
        deleted = 0
        try:
            while True:
                running = [process.poll() is None for process in processes]
                for reader in readers:
                    for line in reader.new_lines():
                        result = _parse_result(line)
                        if result is not None and result.key not in returned:
                            returned.add(result.key)
                            yield result
                written = sum(len(keys) for keys in chunks)
                if not exhausted and written - len(returned) < stage:  # the engines are on the last chunk
                    batch = list(itertools.islice(iterator, stage))
                    if batch:
                        write_chunk(batch)
                    if len(batch) < stage:
                        exhausted = True
                        (tmp / END_OF_REQUESTS).touch()
                while deleted < len(chunks) and returned.issuperset(chunks[deleted]):
                    (tmp / chunk_name(deleted)).unlink(missing_ok=True)
                    deleted += 1
                if not any(running) or (exhausted and deleted == len(chunks)):
                    break
                time.sleep(0.2)
        finally:
            keys = [key for chunk in chunks for key in chunk]
            for process in processes:
                if process.poll() is None and len(returned) < len(keys):
                    process.kill()  # stopped early, by the caller or a failure: do not leave engines running
            for process in processes:
                try:
                    process.wait(timeout=30)  # a finished engine shuts down by itself within seconds
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.returncodes = [process.returncode for process in processes]
        if len(returned) < len(keys):
            tails = "; ".join(_tail(tmp / f"engine-{rank}.log") for rank in range(len(processes)))
            missing = len(keys) - len(returned)
            message = f"vLLM engines exited ({self.returncodes}) with {missing} requests unanswered: {tails}"
            print(message, file=sys.stderr)
            for key in keys:
                if key not in returned:
                    yield GenerationResult(key, failure="engine_exited")


def _devices_of(rank: int, tensor_parallel_size: int, env: dict[str, str]) -> list[str]:
    """The devices of engine `rank`, taken from the caller's CUDA_VISIBLE_DEVICES when it restricts them."""
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    wanted = range(rank * tensor_parallel_size, (rank + 1) * tensor_parallel_size)
    if not visible:
        return [str(index) for index in wanted]
    if wanted[-1] >= len(visible):
        raise ConfigError(
            f"data-parallel engine {rank} needs devices {list(wanted)} but CUDA_VISIBLE_DEVICES lists {len(visible)}"
        )
    return [visible[index] for index in wanted]


class _LineReader:
    """Reads the complete lines appended to a file since the last call (a half-written last line waits)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def new_lines(self) -> list[str]:
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode("utf-8").splitlines()


def _parse_result(line: str) -> GenerationResult | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        return None
    return engine_result(raw)


def engine_result(raw: dict[str, Any]) -> GenerationResult:
    """The result of one of the engine's result records (`vllm_worker.Engine.generate`)."""
    if raw.get("failure"):
        return GenerationResult(raw["key"], failure=raw["failure"])
    return GenerationResult(raw["key"], text=raw["text"], truncated=bool(raw.get("truncated")))


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log {path.name})"
