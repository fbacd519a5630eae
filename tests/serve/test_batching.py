"""The micro-batcher alone (no server): requests being decoded join the batch that waits for them."""

from __future__ import annotations

import asyncio

import pytest

from unime.serve.batching import ArrivalPattern, MicroBatcher


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
        max_queue=8,
        max_batch_items=8,
        max_batch_tokens=1000,
        wait_ms=0,
        batching=True,
        arriving_wait_ms=arriving_wait_ms,
        retry_after_s=1,
    )


async def _first_then_announced_second(batcher: MicroBatcher, *, second_fails: bool) -> list:
    first = batcher.enqueue(["a"], [None], 1)
    pending = [first]
    try:
        with batcher.arriving():  # "b" has arrived and is being decoded while the worker holds "a"
            await asyncio.sleep(0.05)
            if second_fails:
                raise ValueError("b is not valid JSON")
            pending.append(batcher.enqueue(["b"], [None], 1))
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
        return await asyncio.wait_for(batcher.enqueue(["a"], [None], 1), 30)

    try:
        assert asyncio.run(one_request()) == ["a"]
    finally:
        batcher.close(5)
    assert batches == [["a"]]
