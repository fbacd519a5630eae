"""Cutting a batch into forward passes: the cost-aware cut is optimal, and the pass costs are learnt from timings."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from unime.pass_planning import PassCostModel, cost_aware_batches, shape_sorted_batches


def predicted_cost(batches: list[list[int]], lengths: list[int], pass_cost: float, token_cost: float) -> float:
    return sum(pass_cost + token_cost * len(batch) * max(lengths[i] for i in batch) for batch in batches)


def brute_force_least_cost(lengths: list[int], max_items: int, pass_cost: float, token_cost: float) -> float:
    """Every way of cutting the length-sorted inputs into consecutive passes of at most `max_items`."""
    ordered = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(ordered) - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [len(ordered)]
        passes = [ordered[a:b] for a, b in itertools.pairwise(bounds)]
        if all(len(p) <= max_items for p in passes):
            best = min(best, sum(pass_cost + token_cost * len(p) * max(p) for p in passes))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_cost_aware_cut_is_the_least_cost_cut(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(40, 200)]) for _ in range(rng.randint(1, 11))]
    max_items = rng.randint(1, 8)
    pass_cost, token_cost = rng.uniform(0, 50), rng.uniform(0, 1)
    batches = cost_aware_batches(lengths, max_items, pass_cost, token_cost)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))  # each input once
    assert all(1 <= len(batch) <= max_items for batch in batches)
    assert predicted_cost(batches, lengths, pass_cost, token_cost) == pytest.approx(
        brute_force_least_cost(lengths, max_items, pass_cost, token_cost)
    )


def test_overhead_bound_models_run_few_passes_and_compute_bound_ones_split_by_length():
    lengths = [10] * 16 + [300] * 16
    # Fixed cost only: as few passes as the item budget allows (what batching did before).
    assert [len(batch) for batch in cost_aware_batches(lengths, 64, pass_cost=1.0, token_cost=0.0)] == [32]
    assert sorted(len(batch) for batch in cost_aware_batches(lengths, 20, pass_cost=1.0, token_cost=0.0)) == [12, 20]
    # Tokens dominate: the short texts are not padded to the long prompts.
    batches = cost_aware_batches(lengths, 64, pass_cost=1.0, token_cost=1.0)
    assert sorted(sorted(lengths[i] for i in batch) for batch in batches) == [[10] * 16, [300] * 16]


def test_cost_model_recovers_the_costs_of_its_passes():
    rng = np.random.default_rng(0)
    model = PassCostModel(min_passes=8)
    assert model.costs() is None
    fixed, per_item, per_token = 0.004, 0.0012, 2e-5
    for _ in range(7):
        items = int(rng.integers(1, 33))
        padded = items * int(rng.integers(10, 300))
        model.observe(items, padded, fixed + per_item * items + per_token * padded)
    assert model.costs() is None  # fewer passes than min_passes
    for _ in range(30):
        items = int(rng.integers(1, 33))
        padded = items * int(rng.integers(10, 300))
        model.observe(items, padded, (fixed + per_item * items + per_token * padded) * rng.uniform(0.98, 1.02))
    estimated_fixed, estimated_per_token = model.costs()
    assert estimated_fixed == pytest.approx(fixed, rel=0.3)
    assert estimated_per_token == pytest.approx(per_token, rel=0.1)


def test_cost_model_waits_for_passes_that_tell_the_terms_apart():
    model = PassCostModel(min_passes=4)
    for _ in range(10):
        model.observe(8, 800, 0.01)  # every pass alike
    assert model.costs() is None


def test_shape_sorted_batches_keep_every_index_once():
    items = ["ccc", "a", "bb", "dddd", "e"]
    batches = shape_sorted_batches(items, 2, len)
    assert batches == [[1, 4], [2, 0], [3]]
