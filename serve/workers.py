"""HTTP worker processes in front of one model process: `unime serve ... --http-workers N`.

Why. In one process, the event loop (HTTP, JSON, base64 and PNG decoding in its thread pool) and the batcher
threads share one GIL. Measured on a GPU, the model alone gains 5.75x from batches of 32, but the server only
1.90x over batch-1 at 32 concurrent requests: about 4 ms of per-request HTTP and decoding work, serialised by
the GIL, stands in front of the model. That work is independent from one request to the next, so it is spread
over processes; the batching is not (requests merge only in one queue), so the model stays in one process.

Design.

- The main process is the model process: it loads the models and runs one `MicroBatcher` per model, exactly
  as a single-process server does. It binds the listening socket and spawns N workers (the "spawn" context:
  a process that holds torch models, CUDA or a vLLM engine is never forked), handing each the socket (as
  uvicorn's own multi-worker mode does), one end of a pipe, and a picklable description of the models
  (`BackendInfo`: a worker loads no model).
- Each worker runs the same FastAPI app (`unime.serve.app` and its routes: guard, limits, errors, OpenAPI) on the
  shared socket (the kernel hands each connection to one worker), with a `RemoteBatcher` per model in place of
  the `MicroBatcher`: it parses, validates and decodes requests, then sends the decoded inputs (PIL images
  pickle as their raw pixels) over its pipe.
- In the model process one thread per pipe (`ModelService`) puts each request into its model's batcher
  (`MicroBatcher.put`), so requests from all workers merge into the same batches, and sends each its own
  `BatchResult` back. An error goes back as its fields and is raised again in the worker as the error the
  app answers with (exceptions with their own `__init__` do not unpickle): a `RequestError` (with the field,
  index, status and Retry-After: a full queue is 503 + Retry-After), an `InvalidInputError` as the 400 the app
  makes of it, and any other exception as a `ModelProcessError` carrying its type's name, so that the JSON 500
  reads as in one process.
- The "arriving" hint (a request received and still being decoded, which a batch waits for): the worker sends
  +1 when a body is in; the request's own message carries the -1, so the common case costs one extra small
  message; a request that fails to decode sends -1.
- The queue depth each worker's `/health` reports is read from a shared array the model process writes.
  `/metrics` uses prometheus_client's multiprocess mode (see `unime.serve.metrics`), in a private temporary
  directory: whichever worker answers, it reports the whole server.
- Stopping. SIGTERM/SIGINT to the main process: it sends SIGTERM to the workers, which stop accepting, finish
  their requests in flight (the model process keeps serving them) and exit; then the batchers finish and close,
  and the main process exits 0. Requests still unanswered when `shutdown_grace_s` is over get 503 with
  Retry-After from their worker (`unime.serve.lifecycle.ShutdownDeadline`), and the main process exits 0 without
  waiting for a batch still running on the model. A worker that exits on its own (a crash, SIGKILL) stops the
  whole server with exit status 1 and a message naming it, rather than leaving it serving with fewer workers.
  Workers run in a process group of their own, so that a terminal's Ctrl-C reaches them only through the main
  process (twice would force uvicorn out), and stop on their own if the main process disappears (their pipe
  closes).

Measured (`bench/serve.py --http-workers 2`, tiny model, on a shared 2-core machine): a one-item request
through the pipe and back, the model answering at once, takes 540 us against 77 us through an in-process
batcher (about 0.46 ms of latency, one request at a time; under load the trips of different requests overlap).
With two cores for the client, the model process and two workers, the workers only add work there
(micro-batching at concurrency 32: 256 req/s with 2 workers, 341 without); they are for machines with cores
to spare, such as a GPU server, where the per-request decoding rather than the model is the bottleneck: on an
H100 with 16 cores (tiny model, concurrency 32), 4 workers took micro-batching from 320 to 443 req/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

from unime.errors import InvalidInputError
from unime.serve.app import create_app
from unime.serve.config import ServeConfig
from unime.serve.errors import RequestError, ShuttingDownError
from unime.serve.hosting import HostedModel, host_models
from unime.serve.lifecycle import banner, bind_listening_socket, exit_now, graceful_server, load_models
from unime.serve.metrics import MULTIPROC_ENV, ServerMetrics, forget_process, share_metrics_in
from unime.serve.micro_batching import settle_threadsafe

logger = logging.getLogger("unime.serve")

KINDS = ("embedder", "reranker")
"""Hosted model kinds, each with its slot in the shared queue arrays."""


@dataclass(frozen=True)
class SharedQueues:
    """The model process's queue figures that every worker's `/health` and `/ready` read (shared memory)."""

    depths: Any
    """Requests queued per kind (a `RawArray("q")` indexed like `KINDS`)."""
    oldest_since: Any
    """Per kind, the `time.perf_counter()` since which the longest-waiting queued request waits; 0.0 when none
    waits (a `RawArray("d")` indexed like `KINDS`)."""


# --------------------------------------------------------------------------------------------------------
# What crosses the pipe
# --------------------------------------------------------------------------------------------------------
@dataclass
class BackendInfo:
    """What a worker needs to know of a backend that lives in the model process."""

    name: str
    """The backend's name (`transformers`, `vllm`), as `/health` and `/v1/models` report it."""
    dimension: int | None = None
    normalize: bool = True
    matryoshka_dims: list[int] = field(default_factory=list)
    multi_vector_dim: int | None = None
    """Size of the token vectors of an embedder's multi-vector head; None: it has none."""
    single_vector: bool = True
    """Whether an embedder gives pooled vectors (False: its token vectors only)."""
    instructions: dict[str, str | None] = field(default_factory=dict)
    """The instruction of each input type (`query`, `document`)."""

    @classmethod
    def of(cls, backend: Any) -> BackendInfo:
        instruction_for = getattr(backend, "instruction_for", None)
        return cls(
            name=backend.name,
            dimension=getattr(backend, "dimension", None),
            normalize=getattr(backend, "normalize", True),
            matryoshka_dims=list(getattr(backend, "matryoshka_dims", [])),
            multi_vector_dim=getattr(backend, "multi_vector_dim", None),
            single_vector=getattr(backend, "single_vector", True),
            instructions={kind: instruction_for(kind) for kind in ("query", "document")} if instruction_for else {},
        )

    def instruction_for(self, input_type: str | None) -> str | None:
        return None if input_type is None else self.instructions.get(input_type)


class ModelProcessError(Exception):
    """An unexpected error of the model process, raised again in a worker under its original type's name."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


def error_fields(err: BaseException) -> tuple:
    """An error as plain fields, rebuilt by `error_from_fields` into what the app answers the same way."""
    if isinstance(err, InvalidInputError):  # the app's own mapping of it
        err = RequestError(str(err), index=err.index)
    if isinstance(err, RequestError):
        return ("request", err.message, err.param, err.index, err.status, err.retry_after_s)
    return ("other", type(err).__name__, str(err))


def error_from_fields(fields: tuple) -> Exception:
    if fields[0] == "request":
        message, param, index, status, retry_after_s = fields[1:]
        err = RequestError(message, param=param, index=index, status=status)
        err.retry_after_s = retry_after_s
        return err
    return ModelProcessError(fields[1], fields[2])


# --------------------------------------------------------------------------------------------------------
# Model process side
# --------------------------------------------------------------------------------------------------------
class ModelService:
    """Serves the workers' pipes in the model process: one reader thread each, feeding the hosted batchers."""

    def __init__(self, hosted: dict[str, Any]):
        self.hosted = hosted
        self.ready: list[int] = []
        """Pids of the workers that accept connections."""
        self._threads: list[threading.Thread] = []

    def attach(self, conn: Connection, index: int) -> None:
        thread = threading.Thread(target=self._serve, args=(conn,), name=f"http-worker-{index}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve(self, conn: Connection) -> None:
        send_lock = threading.Lock()
        announced = dict.fromkeys(self.hosted, 0)  # this worker's requests being decoded, per model

        def reply(job_id: int, result: Any, error: BaseException | None) -> None:
            message = (job_id, result, None) if error is None else (job_id, None, error_fields(error))
            try:
                with send_lock:  # batcher threads of both models may answer at once
                    conn.send(message)
            except (OSError, ValueError):  # the worker is gone; the main process stops the server
                pass

        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            tag = message[0]
            if tag == "job":
                _, job_id, kind, inputs, instructions, cost, was_announced = message
                batcher = self.hosted[kind].batcher
                try:
                    batcher.put(inputs, instructions, cost, functools.partial(reply, job_id))
                except Exception as err:  # noqa: BLE001 - a full queue, a server shutting down: the worker answers
                    reply(job_id, None, err)
                finally:
                    if was_announced:
                        announced[kind] -= 1
                        batcher.announce(-1)
            elif tag == "arrive":
                _, kind, delta = message
                announced[kind] += delta
                self.hosted[kind].batcher.announce(delta)
            elif tag == "ready":
                self.ready.append(message[1])
            elif tag == "bye":  # the worker is stopping: closing our end ends its reader
                break
        for kind, count in announced.items():  # a worker gone with requests half-decoded: batches stop waiting
            if count:
                self.hosted[kind].batcher.announce(-count)
        with send_lock:
            conn.close()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------------
class Channel:
    """A worker's pipe to the model process: sends requests, and a reader thread settles their futures."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self.closing = False
        self.on_lost: Callable[[], None] = lambda: None
        """Called when the model process has gone away (its end of the pipe closed)."""
        self._reader = threading.Thread(target=self._read, name="model-process-reader", daemon=True)
        self._reader.start()

    def send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as err:  # the model process is gone
            raise ShuttingDownError() from err

    def submit(self, kind: str, inputs: list[Any], instructions: list[str | None], cost: int, announced: bool):
        if self.closing:
            raise ShuttingDownError()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job_id = next(self._ids)
        self._pending[job_id] = (loop, future)
        try:
            self.send(("job", job_id, kind, inputs, instructions, cost, announced))
        except ShuttingDownError:
            del self._pending[job_id]
            raise
        return future

    def close(self) -> None:
        """Take no more requests; the model process closes the pipe, which ends the reader."""
        if not self.closing:
            self.closing = True
            with contextlib.suppress(ShuttingDownError):
                self.send(("bye",))

    def _read(self) -> None:
        while True:
            try:
                job_id, result, error = self._conn.recv()
            except (EOFError, OSError):
                break
            loop, future = self._pending.pop(job_id)
            settle_threadsafe(loop, future, result, None if error is None else error_from_fields(error))
        for job_id in list(self._pending):
            loop, future = self._pending.pop(job_id)
            settle_threadsafe(loop, future, None, ShuttingDownError())
        if not self.closing:
            logger.error("the model process has gone away; this HTTP worker stops")
            self.on_lost()


_ANNOUNCED: contextvars.ContextVar[list | None] = contextvars.ContextVar("unime_announced", default=None)
"""The request (task) being decoded: [its RemoteBatcher, whether its -1 is still owed]."""


class RemoteBatcher:
    """A model process's batcher, as the app in a worker sees it (`unime.serve.hosting.Batcher`)."""

    def __init__(self, channel: Channel, kind: str, queues: SharedQueues):
        self._channel = channel
        self.kind = kind
        self._queues = queues

    @property
    def depth(self) -> int:
        return int(self._queues.depths[KINDS.index(self.kind)])

    @property
    def oldest_wait_s(self) -> float:
        since = self._queues.oldest_since[KINDS.index(self.kind)]
        # perf_counter is the system's monotonic clock, the same in every process of the machine.
        return 0.0 if since == 0.0 else max(0.0, time.perf_counter() - since)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        self._channel.send(("arrive", self.kind, 1))
        state = [self, True]
        token = _ANNOUNCED.set(state)
        try:
            yield
        finally:
            _ANNOUNCED.reset(token)
            if state[1]:  # not queued (it failed to decode): take the announcement back
                with contextlib.suppress(ShuttingDownError):
                    self._channel.send(("arrive", self.kind, -1))

    def enqueue(self, inputs: list[Any], instructions: list[str | None], cost: int) -> asyncio.Future:
        state = _ANNOUNCED.get()
        announced = state is not None and state[0] is self and state[1]
        if announced:
            state[1] = False  # the request's own message takes the announcement back
        return self._channel.submit(self.kind, inputs, instructions, cost, announced)

    def close(self, timeout: float | None = None) -> None:
        del timeout  # the model process finishes what was queued
        self._channel.close()


def run_http_worker(
    config: ServeConfig, models: list[tuple[str, str, BackendInfo]], conn: Connection, sock: Any, queues: SharedQueues
) -> None:
    """A worker process: the app with remote batchers, serving HTTP on the inherited socket."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the main process only, which forwards one SIGTERM
    # Before the metrics are made: their values go to the server's shared directory. The environment inherited
    # from the main process already names it; `share_metrics_in` makes sure prometheus_client writes there.
    share_metrics_in(os.environ[MULTIPROC_ENV])
    channel = Channel(conn)
    hosted = {kind: HostedModel(name, kind, info, RemoteBatcher(channel, kind, queues)) for kind, name, info in models}
    metrics = ServerMetrics()
    server, deadline = graceful_server(create_app(config, hosted, metrics), config)

    def stop() -> None:
        server.should_exit = True

    def report_ready() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        if server.started:
            with contextlib.suppress(ShuttingDownError):
                channel.send(("ready", os.getpid()))

    channel.on_lost = stop
    threading.Thread(target=report_ready, name="report-ready", daemon=True).start()
    # Until uvicorn takes the signals over, a stop makes it return as soon as it has started; after it is done,
    # the signal it raises again lands here too, harmlessly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop())
    server.run(sockets=[sock])
    if deadline.expired:  # its requests are answered; the main process is waiting for it
        exit_now(0)


# --------------------------------------------------------------------------------------------------------
# The main process
# --------------------------------------------------------------------------------------------------------
def serve_with_http_workers(config: ServeConfig) -> NoReturn:
    """Load the models, start the workers, supervise them until a signal or a worker's death."""
    metrics_dir = tempfile.mkdtemp(prefix="unime-metrics-")
    try:
        share_metrics_in(metrics_dir)
        status, busy = _serve(config)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if busy:  # a batch outlasted the grace period: its requests were answered 503 by the workers
        exit_now(status, "unime serve: stopped (grace period over; unfinished requests were answered 503)")
    exit_now(status, "unime serve: stopped")  # as the one-process server does (`unime.serve.server`)


def _serve(config: ServeConfig) -> tuple[int, bool]:
    """Serve until the workers have stopped: the exit status, and whether a batcher is still busy."""
    context = multiprocessing.get_context("spawn")
    queues = SharedQueues(context.RawArray("q", len(KINDS)), context.RawArray("d", len(KINDS)))
    metrics = ServerMetrics()

    def observe_queue(kind: str, depth: int) -> None:
        # Called on every change of the queue (the batcher's lock held; hosted exists by the first request).
        queues.depths[KINDS.index(kind)] = depth
        queues.oldest_since[KINDS.index(kind)] = hosted[kind].batcher.oldest_waiting_since or 0.0

    sock = bind_listening_socket(config)  # before the models load: their engines may pick free ports meanwhile
    try:
        hosted = host_models(config, metrics, observe_queue=observe_queue, **load_models(config))
    except BaseException:
        sock.close()
        raise
    service = ModelService(hosted)
    models = [(kind, model.name, BackendInfo.of(model.backend)) for kind, model in hosted.items()]
    print(f"{banner(config)}, {config.http_workers} HTTP worker processes", flush=True)
    workers = []
    for index in range(config.http_workers):
        ours, theirs = context.Pipe()
        process = context.Process(
            target=run_http_worker, args=(config, models, theirs, sock, queues), name=f"unime-http-{index}"
        )
        process.start()
        theirs.close()
        service.attach(ours, index)
        workers.append(process)
    sock.close()  # the workers hold it now: once they have all stopped, connections are refused

    status, stopping_since = _supervise(config, workers, service, forget_process)
    # The workers have answered every request, those past the grace period 503: the batchers get what is left of
    # the grace period to finish, and a join that returns before the deadline means that they did.
    deadline = stopping_since + config.shutdown_grace_s
    for model in hosted.values():
        model.batcher.close(max(0.0, deadline - time.monotonic()))
    busy = time.monotonic() >= deadline
    service.join(0.1 if busy else 5)
    return status, busy


def _supervise(
    config: ServeConfig, workers: list, service: ModelService, forget_process: Callable
) -> tuple[int, float]:
    """Wait for a signal (stop the workers gracefully) or a worker's exit (stop the server, exit status 1).

    Returns the exit status and when the stop began (`time.monotonic()`)."""
    signals: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: signals.append(signum)) for sig in _STOP_SIGNALS}
    status, stopping_since, forced, announced_ready = 0, None, False, False
    try:
        alive = list(workers)
        while alive:
            wait([process.sentinel for process in alive], timeout=0.1)
            if not announced_ready and len(service.ready) == len(workers):
                announced_ready = True
                print(f"unime serve: {len(workers)} HTTP workers ready", flush=True)
            if signals and stopping_since is None:
                stopping_since = time.monotonic()
                _signal_all(alive, signal.SIGTERM)
            if len(signals) > 1 and not forced:  # asked twice: do not wait for the requests in flight
                forced = True
                _signal_all(alive, signal.SIGINT)
            for process in [process for process in alive if not process.is_alive()]:
                alive.remove(process)
                forget_process(process.pid)
                if stopping_since is None:
                    message = (
                        f"unime serve: error: HTTP worker {process.name} (pid {process.pid}) exited unexpectedly "
                        f"({_exit_reason(process.exitcode)}); stopping the server"
                    )
                    print(message, file=sys.stderr, flush=True)
                    status, stopping_since = 1, time.monotonic()
                    _signal_all(alive, signal.SIGTERM)
                elif process.exitcode not in (0, -signal.SIGTERM):
                    # A worker still starting when the stop came has no handler yet, and the SIGTERM ends it
                    # (-SIGTERM) before it serves anything: a clean stop. Anything else cut requests short.
                    print(f"unime serve: {process.name} exited with {process.exitcode}", file=sys.stderr)
                    status = 1
            if stopping_since is not None and time.monotonic() - stopping_since > config.shutdown_grace_s + 10:
                _signal_all(alive, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status, stopping_since if stopping_since is not None else time.monotonic()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _signal_all(processes: list, sig: int) -> None:
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"
