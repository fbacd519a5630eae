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


def cost_aware_batches(lengths: Sequence[int], max_items: int, pass_cost: float, token_cost: float) -> list[list[int]]:
    """Indices cut into forward passes that minimise `sum(pass_cost + token_cost * items * longest)`.

    A pass pads its inputs to its longest one, so a short text batched with long inputs costs as much as they do;
    but every pass also has a fixed cost (kernel launches, Python). With inputs sorted by length, the best cut is
    found exactly by dynamic programming over the cut points (`max_items` at most per pass). A model whose fixed
    cost dominates (a tiny one) gets one pass; a compute-bound one gets passes of similar lengths.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    sorted_lengths = [lengths[index] for index in order]
    # best[end]: least cost of the first `end` sorted inputs; cut[end]: where its last pass starts.
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = sorted_lengths[end - 1]  # sorted: the last input of a pass is its longest
        for start in range(max(0, end - max_items), end):
            cost = best[start] + pass_cost + token_cost * (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[cut[end] : end])
        end = cut[end]
    return batches[::-1]


class PassCostModel:
    """The time of a forward pass, learnt from the passes run: `fixed + per_item * items + per_token * padded`.

    Least squares over the last `window` passes. `costs()` gives `(fixed, per_token)` for `cost_aware_batches` once
    the passes seen vary enough to tell the terms apart, None before (then callers batch as they did before).
    The per-item term (tokenizing, image decoding) is the same however the inputs are cut, but it must be in the
    fit, or it would be read as a per-token cost.
    """

    def __init__(self, window: int = 64, min_passes: int = 8):
        self.window = window
        self.min_passes = min_passes
        self._passes: list[tuple[int, int, float]] = []

    def observe(self, items: int, padded_tokens: int, seconds: float) -> None:
        self._passes.append((items, padded_tokens, seconds))
        del self._passes[: -self.window]

    def costs(self) -> tuple[float, float] | None:
        import numpy as np

        if len(self._passes) < self.min_passes:
            return None
        data = np.asarray(self._passes, dtype=np.float64)  # [passes, 3]: items, padded tokens, seconds
        design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])  # [passes, 3]
        (fixed, _per_item, per_token), _, _, singular = np.linalg.lstsq(design, data[:, 2], rcond=None)
        if singular[-1] <= singular[0] * 1e-12:  # passes too alike to tell the terms apart yet
            return None
        return max(float(fixed), 0.0), max(float(per_token), 0.0)
