"""The micro-batcher alone (no server): requests being decoded join the batch that waits for them."""

from __future__ import annotations

import asyncio

import pytest

from unime.serve.batching import MicroBatcher


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
