"""Dynamic micro-batching: requests that arrive together run as one batch, up to an item and token budget.

Each hosted model has one `MicroBatcher`: a bounded queue and one worker thread that owns the model. The
worker takes the oldest request, waits up to `wait_ms` for more, merges what fits the budget, runs the
batch through the backend and hands each request its own slice of the results. Requests whose bodies have
arrived but are still being decoded (JSON, images) are announced to the batcher (`arriving`): a batch waits
for them too, up to `arriving_wait_ms`, so that under load they join it instead of forming a small batch
of their own right after it. A request larger than the budget runs alone (the backend splits it into forward
passes). When a merged batch fails, each of its requests is run again alone, so that one bad request fails only
itself.
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

from unime.inputs import EmbedInput
from unime.serve.errors import QueueFullError, ShuttingDownError

logger = logging.getLogger("unime.serve")


def estimated_tokens(item: EmbedInput) -> int:
    """A cheap token estimate for the budget: about 3 characters a token, one token per 28x28 pixels."""
    return 16 + len(item.text or "") // 3 + item.image_pixels // (28 * 28)


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
    """One request's inputs, waiting for a batch."""

    inputs: list[Any]
    """Inputs (embedder) or (query, document) pairs (reranker)."""
    instructions: list[str | None]
    """One instruction per input."""
    cost: int
    """Estimated tokens, for the batch budget."""
    done: Done
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """A bounded queue in front of one model, and the worker thread that runs its batches."""

    def __init__(
        self,
        name: str,
        run: Callable[[Sequence[Any], Sequence[str | None]], Any],
        split: Callable[[Any, list[int]], list[Any]],
        *,
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
        """`run(inputs, instructions)` computes a batch; `split(result, sizes)` cuts it into per-job results."""
        self.name = name
        self._run = run
        self._split = split
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

    async def submit(self, inputs: list[Any], instructions: list[str | None], cost: int) -> Any:
        """Queue a request and wait for its results; raises QueueFullError when the queue is full."""
        return await self.enqueue(inputs, instructions, cost)

    def enqueue(self, inputs: list[Any], instructions: list[str | None], cost: int) -> asyncio.Future:
        """Queue a request; its future gets the results. Raises QueueFullError when the queue is full."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.put(inputs, instructions, cost, functools.partial(settle_threadsafe, loop, future))
        return future

    def put(self, inputs: list[Any], instructions: list[str | None], cost: int, done: Done) -> None:
        """Queue a request from any thread; `done(result, error)` gets its outcome, from the worker thread.

        Raises QueueFullError when the queue is full, ShuttingDownError once `close` has begun.
        """
        job = Job(inputs, instructions, cost, done)
        with self._condition:
            if self._closing:
                raise ShuttingDownError()
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(self.name, self.retry_after_s)
            self._queue.append(job)
            self._arrivals.arrived(job.enqueued)
            self._observe_queue(len(self._queue))
            self._condition.notify()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------
    # Worker side
    # ------------------------------------------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        with self._condition:
            while not self._queue:
                if self._closing:
                    return None
                self._condition.wait()
            jobs = [self._queue.popleft()]
            if self.batching:
                items, tokens = len(jobs[0].inputs), jobs[0].cost
                start = time.perf_counter()
                deadline = start + (self.wait_s if self._arrivals.expect_company() else 0.0)
                arriving_deadline = start + max(self.wait_s, self.arriving_wait_s)
                while True:
                    if self._queue:
                        nxt = self._queue[0]
                        if items + len(nxt.inputs) > self.max_batch_items or tokens + nxt.cost > self.max_batch_tokens:
                            break
                        jobs.append(self._queue.popleft())
                        items, tokens = items + len(nxt.inputs), tokens + nxt.cost
                        continue
                    if self._closing or items >= self.max_batch_items:
                        break
                    now = time.perf_counter()
                    # Requests being decoded will be queued in a moment: wait for them (enqueue or a failed
                    # decode notifies), longer than for requests that may never come.
                    until = arriving_deadline if self._arriving else deadline
                    if now >= until:
                        break
                    self._condition.wait(until - now)
            self._observe_queue(len(self._queue))
            return jobs

    def _work(self) -> None:
        while True:
            jobs = self._take_batch()
            if jobs is None:
                return
            self._observe_batch(sum(len(job.inputs) for job in jobs), len(jobs))
            try:
                self._run_jobs(jobs)
            except BaseException as err:  # noqa: BLE001 - the worker must survive to serve later requests
                if len(jobs) == 1:
                    _resolve(jobs[0], error=err)
                else:
                    for job in jobs:  # find the request at fault: each runs alone
                        try:
                            self._run_jobs([job])
                        except BaseException as job_err:  # noqa: BLE001
                            _resolve(job, error=job_err)

    def _run_jobs(self, jobs: list[Job]) -> None:
        inputs = [item for job in jobs for item in job.inputs]
        instructions = [instruction for job in jobs for instruction in job.instructions]
        result = self._run(inputs, instructions)
        for job, part in zip(jobs, self._split(result, [len(job.inputs) for job in jobs]), strict=True):
            _resolve(job, result=part)


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
