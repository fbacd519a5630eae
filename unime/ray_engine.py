"""The data jobs on a Ray cluster: one model per worker in a Ray Data actor pool, results back to this process.

A data job (embedding a corpus, mining, evaluation) runs here by default (`engine: local`); with `engine: ray`
its model work goes to a pool of Ray actors, each of which builds its model ONCE (`make_worker`, e.g. loading a
model directory with `unime.load`) and then handles block after block of records (`Dataset.map_batches` with a
fixed `ActorPoolStrategy`). The records travel as JSON, the outputs come back to this process (the driver) in
record order as blocks finish, and the driver writes them: into the one embedding store (`fill_store_on_ray`), or,
for another job, wherever it writes (`map_records` is the generic part).

Why the driver writes, not the workers: the store's `fill` is the one place that decides what is missing, writes
shards atomically and resumes, and with one writer the store needs no folder shared by every node. Ray emits a
block's output only once its task finished, so a worker killed mid-block (Ray restarts the actor and retries the
block, `max_restarts` times) never delivers a half block, and a retried block is delivered once: every key is
written exactly once. A job killed as a whole keeps every shard the driver wrote (at most one shard's worth is
lost) and a rerun sends only the missing keys to the cluster.

```python
settings = RaySettings(num_workers=2)
with ray_cluster(settings):
    fill_store_on_ray(store, keys, items, EncoderFactory(...), settings)
```
"""

from __future__ import annotations

import json
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from unime.embedding_store import EmbeddingStore
from unime.errors import ConfigError, UnimeError
from unime.inputs import Input

Worker = Callable[[list[dict[str, Any]]], Any]
"""Records in (JSON-able dicts), one output per record out (a `[n, D]` array, or a list)."""

WorkerFactory = Callable[[], Worker]
"""Builds a worker: called once per actor (where the model is loaded). Must be picklable: a module-level class
instance holding a model's path and settings, not a loaded model."""

Encode = Callable[[list[Input]], Any]
"""Inputs in, `[n, D]` vectors out, row i for input i."""

EncoderFactory = Callable[[], Encode]
"""Builds an `Encode` once per actor (picklable, like `WorkerFactory`)."""


class RayClusterError(UnimeError, RuntimeError):
    """The Ray cluster cannot be reached or cannot run the job; the message names the address."""


@dataclass
class RaySettings:
    """Where and how a data job runs on Ray (with `engine: ray`)."""

    address: str | None = None
    """The cluster: `host:port` of its head (GCS), `ray://host:port` (Ray Client), or `auto` (the cluster this
    machine joined); None starts a local cluster on this machine for the job."""
    num_workers: int = 2
    """Actors in the pool, each holding one copy of the model."""
    cpus_per_worker: float = 1.0
    """CPUs each actor reserves (Ray sets its OMP_NUM_THREADS to this)."""
    gpus_per_worker: float = 0.0
    """GPUs each actor reserves (1 for a model per GPU; a fraction packs several per GPU)."""
    batch_size: int = 64
    """Records per block sent to an actor (the unit of retry and of progress)."""
    connect_timeout_s: float = 30.0
    """Seconds to wait for the cluster's address to answer before failing (Ray itself would retry for minutes)."""
    max_restarts: int = 3
    """Times a dead actor is restarted, and its block retried, before the job fails."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"ray.num_workers must be >= 1, got {self.num_workers}")
        if self.batch_size < 1:
            raise ValueError(f"ray.batch_size must be >= 1, got {self.batch_size}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError(
                f"ray.cpus_per_worker must be > 0 and ray.gpus_per_worker >= 0, got {self.cpus_per_worker} and "
                f"{self.gpus_per_worker}"
            )
        if self.connect_timeout_s <= 0:
            raise ValueError(f"ray.connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if self.max_restarts < 0:
            raise ValueError(f"ray.max_restarts must be >= 0, got {self.max_restarts}")


@dataclass(kw_only=True)
class EngineSettings:
    """Where a data job's model work runs: here, or on a Ray cluster (a settings section of the data commands)."""

    engine: Literal["local", "ray"] = "local"
    """`local`: in this process; `ray`: in an actor pool on a Ray cluster (`ray.*` settings; the `ray` extra)."""
    ray: RaySettings = field(default_factory=RaySettings)
    """The Ray cluster and pool, with `engine: ray`."""

    @property
    def on_ray(self) -> bool:
        return self.engine == "ray"


# The cluster ----------------------------------------------------------------------------------------------------


def _host_port(address: str) -> tuple[str, int] | None:
    """`(host, port)` of a `host:port` or `ray://host:port` address; None for `auto`/`local`."""
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep:
        return None
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ConfigError(f"ray.address {address!r}: expected host:port, ray://host:port or auto") from None


def check_address_answers(address: str, timeout_s: float) -> None:
    """Fail within `timeout_s` unless `address` answers as a gRPC server does (a Ray head's GCS, or a Ray Client
    server): `ray.init` on an address that accepts no connection, or accepts and stays silent, retries for
    minutes."""
    import grpc  # a dependency of ray (the optional `ray` extra)

    target = _host_port(address)
    if target is None:
        return
    host, port = target
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as err:
        raise RayClusterError(f"ray.address {address!r}: cannot resolve {host!r} ({err})") from err
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        raise RayClusterError(
            f"the Ray cluster at {address} did not answer within {timeout_s:g} s (ray.connect_timeout_s): is its "
            "head running (`ray start --head`), and is the port open from here?"
        ) from None
    finally:
        channel.close()


@contextmanager
def ray_cluster(settings: RaySettings) -> Iterator[None]:
    """Connected to the cluster for the block: an existing connection is reused; a cluster started here (address
    None) is shut down after, one connected to is left running."""
    try:
        import ray  # heavy optional dependency (the `ray` extra)
    except ImportError as err:
        raise ConfigError(f"engine ray needs Ray: pip install 'unime[ray]' ({err})") from err

    if ray.is_initialized():
        yield
        return
    if settings.address is None:
        ray.init(include_dashboard=False)
    else:
        check_address_answers(settings.address, settings.connect_timeout_s)
        try:
            ray.init(address=settings.address)
        except (ConnectionError, RuntimeError) as err:
            raise RayClusterError(f"cannot join the Ray cluster at {settings.address}: {err}") from err
    try:
        yield
    finally:
        ray.shutdown()


def check_capacity(settings: RaySettings) -> None:
    """Refuse a pool the cluster cannot hold: Ray Data would wait for the missing actors forever."""
    import ray  # heavy optional dependency (the `ray` extra)

    resources = ray.cluster_resources()
    for name, each in (("CPU", settings.cpus_per_worker), ("GPU", settings.gpus_per_worker)):
        needed = each * settings.num_workers
        if needed > resources.get(name, 0.0) + 1e-9:
            raise RayClusterError(
                f"ray.num_workers={settings.num_workers} workers need {needed:g} {name}s but the cluster has "
                f"{resources.get(name, 0.0):g}; lower ray.num_workers or ray.{name.lower()}s_per_worker"
            )


# The job --------------------------------------------------------------------------------------------------------


class _PoolWorker:
    """One actor of the pool: builds its worker (the model) once, then turns blocks of records into outputs."""

    def __init__(self, make_worker: WorkerFactory) -> None:
        self.work = make_worker()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [json.loads(record) for record in batch["record"]]
        outputs = self.work(records)
        if len(outputs) != len(records):
            raise UnimeError(f"the worker returned {len(outputs)} outputs for {len(records)} records")
        return {"position": np.asarray(batch["position"]), "output": np.asarray(outputs)}


def map_records(
    records: Sequence[dict[str, Any]],
    make_worker: WorkerFactory,
    settings: RaySettings,
    *,
    positions: Sequence[int] | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Run `make_worker()`'s worker over `records` on the connected cluster (see `ray_cluster`).

    Yields `(positions, outputs)` per finished block, in record order; `positions` are `positions[i]` (default
    i) of the records in the block. Ray shows a progress bar per operator.
    """
    import ray  # heavy optional dependency (the `ray` extra)

    check_capacity(settings)
    positions = list(range(len(records))) if positions is None else list(positions)
    if not records:
        return
    rows = [
        {"position": position, "record": json.dumps(record)}
        for position, record in zip(positions, records, strict=True)
    ]
    context = ray.data.DataContext.get_current()
    kept_order = context.execution_options.preserve_order
    # In order: the driver then holds at most a few blocks that arrived ahead of the one it waits for.
    context.execution_options.preserve_order = True
    try:
        with warnings.catch_warnings():
            # Ray 2.60 deprecates passing `max_restarts` through `**ray_remote_args` but names no other way yet.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
            dataset = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // settings.batch_size)).map_batches(
                _PoolWorker,
                fn_constructor_kwargs={"make_worker": make_worker},
                batch_size=settings.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=settings.num_workers),
                num_cpus=settings.cpus_per_worker,
                num_gpus=settings.gpus_per_worker or None,
                # A dead actor is restarted and its block retried, a bounded number of times (Ray's default for
                # an actor pool is forever, which turns a worker that always crashes into a hang).
                max_restarts=settings.max_restarts,
                max_task_retries=settings.max_restarts,
            )
        for block in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            yield block["position"].tolist(), block["output"]
    finally:
        context.execution_options.preserve_order = kept_order


def input_record(item: Input) -> dict[str, Any]:
    """An input as a JSON record for the workers (an image by its file path, which the workers must see)."""
    if item.image is not None and not isinstance(item.image, (str, Path)):
        raise ConfigError("a Ray job takes images as file paths (every worker reads them), not decoded images")
    return {
        "text": item.text,
        # Absolute: a worker's current folder is not the driver's.
        "image": str(Path(item.image).resolve()) if item.image is not None else None,
        "instruction": item.instruction,
        "role": item.role,
    }


def record_input(record: dict[str, Any]) -> Input:
    """The input of an `input_record`."""
    image = record.get("image")
    return Input(
        text=record.get("text"),
        image=Path(image) if image is not None else None,
        instruction=record.get("instruction"),
        role=record.get("role"),
    )


@dataclass
class _InputsWorker:
    """A `WorkerFactory` of an `EncoderFactory`: records become inputs, vectors come back as float32."""

    make_encoder: EncoderFactory

    def __call__(self) -> Worker:
        encode = self.make_encoder()

        def work(records: list[dict[str, Any]]) -> np.ndarray:
            return np.asarray(encode([record_input(record) for record in records]), dtype=np.float32)  # [n, D]

        return work


def fill_store_on_ray(
    store: EmbeddingStore,
    keys: Sequence[str],
    items: Sequence[Input],
    make_encoder: EncoderFactory,
    settings: RaySettings,
    *,
    source: str = "the encoder",
    label: Callable[[int], str] | None = None,
    unit: str = "inputs",
) -> int:
    """`store.fill(keys, ...)` with the vectors computed on the connected Ray cluster: only the keys not stored
    are sent (each distinct key once), and the driver writes them into the store as blocks come back (a shard
    every `store.shard_size` vectors).

    Args:
        store: the embedding store to fill.
        keys: one content key per item.
        items: what to embed, item i for key i (images as file paths).
        make_encoder: builds the encoder in each actor (see `EncoderFactory`).
        settings: the pool.
        source, label, unit: as in `EmbeddingStore.fill`, for error messages.

    Returns:
        How many vectors were computed.
    """
    first: dict[str, int] = {}
    for position in store.missing(keys):
        first.setdefault(keys[position], position)
    # An actor batches within its block only, so the blocks are cut from inputs sorted by shape (modality, image
    # size, text length), as the local path's batches are cut from a sorted shard: mixed blocks pad every short
    # input to the longest one beside it (1 worker ran at 1.37x the local time on a mixed corpus before this).
    todo = sorted(first.values(), key=lambda position: _shape_key(items[position]))
    if not todo:
        return 0
    stream = map_records([input_record(items[p]) for p in todo], _InputsWorker(make_encoder), settings, positions=todo)
    arrived: dict[int, np.ndarray] = {}  # position -> its vector, until the store asks for it

    def compute(batch: list[int]) -> np.ndarray:
        wanted = [todo[index] for index in batch]  # the store asks in `todo`'s order, the order blocks arrive in
        for position in wanted:
            while position not in arrived:
                block = next(stream, None)
                if block is None:
                    raise UnimeError(f"the Ray job ended without the vector of {unit} {position}")
                block_positions, vectors = block  # vectors: [block, D]
                arrived.update(zip(block_positions, vectors, strict=True))
        return np.stack([arrived.pop(position) for position in wanted])  # [len(batch), D]

    name = label or (lambda position: f"input {position}")
    try:
        # Filled in arrival order, so that the driver writes a shard as soon as its blocks are back.
        return store.fill(
            [keys[position] for position in todo],
            compute,
            batch_size=settings.batch_size,
            source=source,
            label=lambda index: name(todo[index]),
            unit=unit,
        )
    finally:
        stream.close()


def _shape_key(item: Input) -> tuple[bool, int, int]:
    """Modality, image pixels and text length: inputs with equal keys pad little when batched together."""
    pixels = item.image_pixels
    if item.image is not None and not pixels and isinstance(item.image, (str, Path)):
        try:
            with Image.open(item.image) as image:  # reads the header only
                pixels = image.width * image.height
        except (OSError, ValueError):
            pixels = 0  # a bad image is the worker's to report, naming it
    return item.image is not None, pixels, len(item.text or "")


@dataclass
class RayEncoding:
    """Embedding on a Ray cluster: how each actor builds its encoder, and the pool. Callers that hold one fill their
    embedding store through `fill` instead of `EmbeddingStore.fill` (inside `ray_cluster(settings)`)."""

    make_encoder: EncoderFactory
    """Builds the encoder once per actor (picklable: a model's path and settings)."""
    settings: RaySettings
    """The cluster and the pool."""

    def fill(self, store: EmbeddingStore, keys: Sequence[str], items: Sequence[Input], **fill_kwargs: Any) -> int:
        """`fill_store_on_ray` with this encoder and pool."""
        return fill_store_on_ray(store, keys, items, self.make_encoder, self.settings, **fill_kwargs)
