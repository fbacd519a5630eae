"""Group inputs into batches of similar shape, so that padding (and wasted compute) stays small."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def shape_sorted_batches(items: Sequence[T], batch_size: int, sort_key: Callable[[T], Any]) -> list[list[int]]:
    """Indices of `items` cut into batches of at most `batch_size`, after sorting by `sort_key`.

    The caller scatters each batch's results back to these indices, so the output keeps input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(items)), key=lambda index: sort_key(items[index]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
