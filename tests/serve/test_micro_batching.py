"""The micro-batcher alone (no server): requests being decoded join the batch that waits for them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from unime.serve.micro_batching import ArrivalPattern, MicroBatcher


def _batcher(batches: list[list[str]], arriving_wait_ms: float) -> MicroBatcher:
    def run(inputs, instructions):
        batches.append(list(inputs))
        return list(inputs)

    def split(result, sizes):
        parts, start = [], 0
        for size in sizes:
            parts.append(result[start : start + size])
            start += size
        return parts

    return MicroBatcher(
        "m",
        run,
        split,
        join=lambda parts: [item for part in parts for item in part],
        max_queue=8,
        max_batch_items=8,
        max_batch_tokens=1000,
        wait_ms=0,
        batching=True,
        arriving_wait_ms=arriving_wait_ms,
        retry_after_s=1,
    )


async def _first_then_announced_second(batcher: MicroBatcher, *, second_fails: bool) -> list:
    first = batcher.enqueue(["a"], [None], [1])
    pending = [first]
    try:
        with batcher.arriving():  # "b" has arrived and is being decoded while the worker holds "a"
            await asyncio.sleep(0.05)
            if second_fails:
                raise ValueError("b is not valid JSON")
            pending.append(batcher.enqueue(["b"], [None], [1]))
    except ValueError:
        pass
    # A guard against a batch left waiting (the wait is a minute): far above the milliseconds this takes.
    return [await asyncio.wait_for(future, 30) for future in pending]


@pytest.mark.parametrize(("arriving_wait_ms", "expected"), [(60_000, [["a", "b"]]), (0, [["a"], ["b"]])])
def test_a_batch_waits_for_a_request_being_decoded(arriving_wait_ms, expected) -> None:
    batches: list[list[str]] = []
    batcher = _batcher(batches, arriving_wait_ms)
    try:
        assert asyncio.run(_first_then_announced_second(batcher, second_fails=False)) == [["a"], ["b"]]
    finally:
        batcher.close(5)
    assert batches == expected


def test_a_request_that_fails_to_decode_stops_the_wait() -> None:
    batches: list[list[str]] = []
    batcher = _batcher(batches, 60_000)  # without the wake-up on failure, "a" would wait a minute: TimeoutError
    try:
        assert asyncio.run(_first_then_announced_second(batcher, second_fails=True)) == [["a"]]
    finally:
        batcher.close(5)
    assert batches == [["a"]]


def test_arrival_pattern_expects_company_only_for_bunched_requests() -> None:
    wait_s = 0.002
    first_known = ArrivalPattern(wait_s)
    assert first_known.expect_company()  # nothing known yet: wait, as a batcher always did

    one_at_a_time = ArrivalPattern(wait_s)  # a closed loop at concurrency 1: one request every 10 ms
    for index in range(40):
        one_at_a_time.arrived(index * 0.010)
    assert not one_at_a_time.expect_company()

    bunches = ArrivalPattern(wait_s)  # 8 requests within a millisecond, every 30 ms
    for burst in range(10):
        for index in range(8):
            bunches.arrived(burst * 0.030 + index * 0.0001)
    assert bunches.expect_company()

    pairs = ArrivalPattern(wait_s)  # concurrency 2: half the arrivals are close
    for index in range(40):
        pairs.arrived((index // 2) * 0.010 + (index % 2) * 0.0005)
    assert pairs.expect_company()


def test_a_lone_request_does_not_wait_for_company_that_never_comes() -> None:
    batches: list[list[str]] = []
    batcher = _batcher(batches, 0)
    batcher.wait_s = batcher._arrivals.wait_s = 60.0  # a minute's wait for more requests...
    for index in range(8):  # ...after requests that came one at a time, minutes apart
        batcher._arrivals.arrived(-1000.0 * (8 - index))

    async def one_request() -> list:
        # A guard against a batch left waiting (the wait is a minute): far above the milliseconds this takes.
        return await asyncio.wait_for(batcher.enqueue(["a"], [None], [1]), 30)

    try:
        assert asyncio.run(one_request()) == ["a"]
    finally:
        batcher.close(5)
    assert batches == [["a"]]


# ------------------------------------------------------------------------------------------------------------
# A request larger than the budget runs in slices, with the requests queued behind it between them
# ------------------------------------------------------------------------------------------------------------
def test_a_large_request_is_cut_and_a_small_one_runs_between_its_slices() -> None:
    batches: list[list[str]] = []
    batcher = _batcher(batches, 0)
    batcher.max_batch_tokens = 100
    release = threading.Event()
    original = batcher._run

    def held_run(inputs, instructions):  # the first batch waits until both requests are queued
        release.wait(30)
        return original(inputs, instructions)

    batcher._run = held_run

    async def two_requests() -> tuple[list, list]:
        large = batcher.enqueue([f"L{i}" for i in range(6)], [None] * 6, [40] * 6)  # 240 tokens: 3 slices
        await asyncio.sleep(0.05)  # the first slice has been taken
        small = batcher.enqueue(["s"], [None], [10])
        release.set()
        return await asyncio.wait_for(large, 30), await asyncio.wait_for(small, 30)

    try:
        large, small = asyncio.run(two_requests())
    finally:
        batcher.close(5)
    assert large == [f"L{i}" for i in range(6)] and small == ["s"]  # each gets its own results, in order
    # No batch is over the budget; the small request ran right after the first slice, not after all of them.
    assert batches == [["L0", "L1"], ["s", "L2", "L3"], ["L4", "L5"]]


def test_an_input_larger_than_the_whole_budget_runs_alone() -> None:
    batches: list[list[str]] = []
    batcher = _batcher(batches, 0)
    batcher.max_batch_tokens = 100

    async def one() -> list:
        return await asyncio.wait_for(batcher.enqueue(["a", "huge", "b"], [None] * 3, [10, 500, 10]), 30)

    try:
        assert asyncio.run(one()) == ["a", "huge", "b"]
    finally:
        batcher.close(5)
    assert batches == [["a"], ["huge"], ["b"]]


def test_a_failed_slice_fails_its_request_with_the_request_s_own_index_and_drops_the_rest() -> None:
    from unime.errors import InvalidInputError

    batches: list[list[str]] = []
    batcher = _batcher(batches, 0)
    batcher.max_batch_tokens = 20
    original = batcher._run

    def run(inputs, instructions):
        if "bad" in inputs:
            raise InvalidInputError(inputs.index("bad"), "cannot read it")
        return original(inputs, instructions)

    batcher._run = run

    async def one() -> None:
        await asyncio.wait_for(batcher.enqueue(["a", "b", "c", "bad", "d", "e"], [None] * 6, [10] * 6), 30)

    try:
        with pytest.raises(InvalidInputError, match="input 3: cannot read it"):
            asyncio.run(one())
        assert batcher.depth == 0
    finally:
        batcher.close(5)
    assert batches == [["a", "b"]]  # the slice after the failed one never ran


def test_oldest_wait_counts_queued_requests_not_one_being_served() -> None:
    batches: list[list[str]] = []
    batcher = _batcher(batches, 0)
    release = threading.Event()
    original = batcher._run
    batcher._run = lambda inputs, instructions: (release.wait(30), original(inputs, instructions))[1]

    async def scenario() -> tuple[float, float, float]:
        first = batcher.enqueue(["a"], [None], [1])
        await asyncio.sleep(0.05)
        running_only = batcher.oldest_wait_s  # "a" is running: nothing waits
        second = batcher.enqueue(["b"], [None], [1])
        await asyncio.sleep(0.3)
        waiting = batcher.oldest_wait_s  # "b" has waited behind the held batch
        release.set()
        await asyncio.wait_for(first, 30)
        await asyncio.wait_for(second, 30)
        return running_only, waiting, batcher.oldest_wait_s

    try:
        running_only, waiting, after = asyncio.run(scenario())
    finally:
        release.set()
        batcher.close(5)
    assert running_only == 0.0 and waiting >= 0.25 and after == 0.0
