"""Dynamic micro-batching: requests that arrive together run as one batch, up to an item and token budget.

Each hosted model has one `MicroBatcher`: a bounded queue and one worker thread that owns the model. The
worker takes the oldest request, waits up to `wait_ms` for more, merges what fits the budget, runs the
batch through the backend and hands each request its own slice of the results. Requests whose bodies have
arrived but are still being decoded (JSON, images) are announced to the batcher (`arriving`): a batch waits
for them too, up to `arriving_wait_ms`, so that under load they join it instead of forming a small batch
of their own right after it. A request larger than the budget is cut: each batch takes the inputs of it that
fit, and the rest goes to the back of the queue, so that requests queued behind a large one run between its
slices instead of waiting for all of it (the model time any request waits for is one batch, not one request).
When a merged batch fails, each of its requests is run again alone, so that one bad request fails only itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from unime.errors import InvalidInputError
from unime.inputs import Input
from unime.serve.errors import QueueFullError, ShuttingDownError

logger = logging.getLogger("unime.serve")


PIXELS_PER_TOKEN = 28 * 28
"""Image pixels per prompt token (Qwen2-VL's 14x14 patches merged 2x2), for token estimates and budgets."""


def estimated_tokens(item: Input, instruction: str | None = None) -> int:
    """A cheap token estimate: about 3 characters a token (the instruction's too), one token per 28x28 pixels."""
    return 16 + (len(item.text or "") + len(instruction or "")) // 3 + item.image_pixels // PIXELS_PER_TOKEN


Done = Callable[[Any, "BaseException | None"], None]
"""`done(result, error)`: how a job's outcome reaches its caller, called once from the worker thread."""


class ArrivalPattern:
    """Whether a request is likely to get company during the batch wait, from how the recent requests arrived.

    Waiting `wait_s` for requests nobody has sent yet pays only when requests come in bunches; a client sending
    one request after another (concurrency 1, a trickle of traffic) would pay the wait in latency on every
    request and gain nothing. The last `window` arrivals are remembered as close (within `wait_s` of the one
    before) or not: a batch waits while at least half of them were close, and always until a few are known.
    Requests already received and still being decoded are another matter: a batch waits for them regardless.
    """

    def __init__(self, wait_s: float, window: int = 32, min_known: int = 4):
        self.wait_s = wait_s
        self.min_known = min_known
        self._close: collections.deque[bool] = collections.deque(maxlen=window)
        self._last: float | None = None

    def arrived(self, now: float) -> None:
        if self._last is not None:
            self._close.append(now - self._last <= self.wait_s)
        self._last = now

    def expect_company(self) -> bool:
        if len(self._close) < self.min_known:
            return True
        return 2 * sum(self._close) >= len(self._close)


@dataclass
class Job:
    """One request's inputs, waiting for a batch (a large one for several batches, a slice in each)."""

    inputs: list[Any]
    """Inputs (embedder) or (query, document) pairs (reranker)."""
    instructions: list[str | None]
    """One instruction per input."""
    costs: list[int]
    """Tokens of each input (its whole prompt), for the batch budget."""
    done: Done
    waiting_since: float = field(default_factory=time.perf_counter)
    """When it was queued, or queued again after its last slice ran: how long it has waited for the model."""
    taken: int = 0
    """Inputs handed to batches so far (the next slice starts here)."""
    parts: list[Any] = field(default_factory=list)
    """Results of its slices that have run, in order."""
    finished: bool = False
    """Resolved (all slices ran, or one failed): slices not yet run are dropped."""


@dataclass
class Slice:
    """The inputs `start:stop` of a job, run in one batch."""

    job: Job
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class MicroBatcher:
    """A bounded queue in front of one model, and the worker thread that runs its batches."""

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[Any], Sequence[str | None]], Any],
        split: Callable[[Any, list[int]], list[Any]],
        *,
        join: Callable[[list[Any]], Any],
        max_queue: int,
        max_batch_items: int,
        max_batch_tokens: int,
        wait_ms: float,
        batching: bool,
        arriving_wait_ms: float = 0.0,
        retry_after_s: int,
        observe_batch: Callable[[int, int], None] = lambda items, requests: None,
        observe_queue: Callable[[int], None] = lambda depth: None,
    ):
        """`run(inputs, instructions)` computes a batch; `split(result, sizes)` cuts it into per-slice results, and
        `join(results)` puts the results of a request's slices back together."""
        self.name = name
        self._run = run
        self._split = split
        self._join = join
        self.max_queue = max_queue
        self.max_batch_items = max_batch_items
        self.max_batch_tokens = max_batch_tokens
        self.wait_s = wait_ms / 1000
        self.arriving_wait_s = arriving_wait_ms / 1000
        self.batching = batching
        self.retry_after_s = retry_after_s
        self._observe_batch = observe_batch
        self._observe_queue = observe_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._condition = threading.Condition()
        self._closing = False
        self._arriving = 0
        self._arrivals = ArrivalPattern(self.wait_s)
        self._thread = threading.Thread(target=self._work, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------------
    # Event-loop side
    # ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Announce a request being decoded, from its received body up to its `enqueue`: batches wait for it."""
        self.announce(1)
        try:
            yield
        finally:
            self.announce(-1)

    def announce(self, delta: int) -> None:
        """Count requests being decoded up (+1, body received) or down (-1, queued or failed); thread-safe."""
        with self._condition:
            self._arriving += delta
            if delta < 0:
                self._condition.notify()

    async def submit(self, inputs: list[Any], instructions: list[str | None], costs: list[int]) -> Any:
        """Queue a request and wait for its results; raises QueueFullError when the queue is full."""
        return await self.enqueue(inputs, instructions, costs)

    def enqueue(self, inputs: list[Any], instructions: list[str | None], costs: list[int]) -> asyncio.Future:
        """Queue a request; its future gets the results. Raises QueueFullError when the queue is full."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.put(inputs, instructions, costs, functools.partial(settle_threadsafe, loop, future))
        return future

    def put(self, inputs: list[Any], instructions: list[str | None], costs: list[int], done: Done) -> None:
        """Queue a request from any thread; `done(result, error)` gets its outcome, from the worker thread.

        `costs` are the tokens of each input. Raises QueueFullError when the queue is full, ShuttingDownError
        once `close` has begun.
        """
        if not len(inputs) == len(instructions) == len(costs):
            raise ValueError(f"{len(inputs)} inputs, {len(instructions)} instructions and {len(costs)} costs")
        job = Job(list(inputs), list(instructions), list(costs), done)
        with self._condition:
            if self._closing:
                raise ShuttingDownError()
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(self.name, self.retry_after_s)
            self._queue.append(job)
            self._arrivals.arrived(job.waiting_since)
            self._observe_queue(len(self._queue))
            self._condition.notify()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def oldest_wait_s(self) -> float:
        """Seconds the longest-waiting queued request has waited for the model (0 when none waits).

        A request cut into slices waits from the end of its last slice, not from its arrival: while the model
        keeps working through it and the requests between its slices, it is served, not stuck.
        """
        since = self.oldest_waiting_since
        return 0.0 if since is None else max(0.0, time.perf_counter() - since)

    @property
    def oldest_waiting_since(self) -> float | None:
        """`time.perf_counter()` (the system's monotonic clock, the same in every process) since which the
        longest-waiting queued request has waited; None when none waits. Safe to read from `observe_queue`."""
        with self._condition:  # reentrant: observe_queue is called with it held
            return min((job.waiting_since for job in self._queue), default=None)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------
    # Worker side
    # ------------------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Slice] | None:
        with self._condition:
            while not self._queue:
                if self._closing:
                    return None
                self._condition.wait()
            batch = [self._take_slice(budget_items=self.max_batch_items, budget_tokens=self.max_batch_tokens)]
            items, tokens = batch[0].size, sum(batch[0].job.costs[batch[0].start : batch[0].stop])
            if self.batching:
                start = time.perf_counter()
                deadline = start + (self.wait_s if self._arrivals.expect_company() else 0.0)
                arriving_deadline = start + max(self.wait_s, self.arriving_wait_s)
                while items < self.max_batch_items and tokens < self.max_batch_tokens:
                    if self._queue:
                        piece = self._take_slice(self.max_batch_items - items, self.max_batch_tokens - tokens)
                        if piece is None:  # its next input does not fit what is left of the budget
                            break
                        batch.append(piece)
                        items, tokens = items + piece.size, tokens + sum(piece.job.costs[piece.start : piece.stop])
                        continue
                    if self._closing:
                        break
                    now = time.perf_counter()
                    # Requests being decoded will be queued in a moment: wait for them (enqueue or a failed
                    # decode notifies), longer than for requests that may never come.
                    until = arriving_deadline if self._arriving else deadline
                    if now >= until:
                        break
                    self._condition.wait(until - now)
            self._observe_queue(len(self._queue))
            return batch

    def _take_slice(self, budget_items: int, budget_tokens: int) -> Slice | None:
        """The inputs of the oldest queued request that fit the budget (at least one when the batch is empty).

        The request leaves the queue; one with inputs left goes back to its end once this slice has run
        (`_requeue`), behind the requests that came meanwhile. Called with the lock held.
        """
        job = self._queue[0]
        empty_batch = budget_items == self.max_batch_items and budget_tokens == self.max_batch_tokens
        stop, tokens = job.taken, 0
        while stop < len(job.inputs) and stop - job.taken < budget_items:
            if tokens + job.costs[stop] > budget_tokens and not (empty_batch and stop == job.taken):
                break  # a single input larger than the whole budget still runs, alone
            tokens += job.costs[stop]
            stop += 1
        if stop == job.taken:
            return None
        self._queue.popleft()
        piece = Slice(job, job.taken, stop)
        job.taken = stop
        return piece

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._observe_batch(sum(piece.size for piece in batch), len(batch))
            try:
                self._run_slices(batch)
            except BaseException as err:  # noqa: BLE001 - the worker must survive to serve later requests
                if len(batch) == 1:
                    self._fail(batch[0], err)
                else:
                    for piece in batch:  # find the request at fault: each runs alone
                        try:
                            self._run_slices([piece])
                        except BaseException as piece_err:  # noqa: BLE001
                            self._fail(piece, piece_err)
            finally:
                self._requeue([piece.job for piece in batch])

    def _run_slices(self, batch: list[Slice]) -> None:
        batch = [piece for piece in batch if not piece.job.finished]  # a request whose earlier slice failed
        if not batch:
            return
        inputs = [item for piece in batch for item in piece.job.inputs[piece.start : piece.stop]]
        instructions = [text for piece in batch for text in piece.job.instructions[piece.start : piece.stop]]
        result = self._run(inputs, instructions)
        for piece, part in zip(batch, self._split(result, [piece.size for piece in batch]), strict=True):
            piece.job.parts.append(part)
            if piece.stop == len(piece.job.inputs):
                piece.job.finished = True
                parts = piece.job.parts
                _resolve(piece.job, result=parts[0] if len(parts) == 1 else self._join(parts))

    def _fail(self, piece: Slice, error: BaseException) -> None:
        """Resolve a request with the error of one of its slices; its other inputs are not run."""
        job = piece.job
        if isinstance(error, InvalidInputError) and error.index is not None and piece.start:
            # The index counts from the start of the slice: make it the request's own.
            error = InvalidInputError(error.index + piece.start, str(error).split(": ", 1)[-1])
        job.finished = True
        _resolve(job, error=error)

    def _requeue(self, jobs: list[Job]) -> None:
        """Requests with inputs left go to the end of the queue, waiting again from now."""
        left = [job for job in jobs if not job.finished and job.taken < len(job.inputs)]
        if not left:
            return
        now = time.perf_counter()
        with self._condition:
            for job in left:
                job.waiting_since = now
                self._queue.append(job)
            self._observe_queue(len(self._queue))


def _resolve(job: Job, *, result: Any = None, error: BaseException | None = None) -> None:
    try:
        job.done(result, error)
    except Exception:  # noqa: BLE001 - a caller's failure to take its result must not stop the worker
        logger.exception("delivering a result failed")


def settle_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any, error: BaseException | None
) -> None:
    def settle() -> None:
        if future.done():  # the client went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: nobody waits for this result any more
        pass
