"""Each metric against cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unime.metrics import (
    hit_at_k,
    mrr,
    ndcg_at_k,
    ndcg_at_k_multi,
    pairwise_accuracy,
    recall_at_k_multi,
)


def test_hit_at_k_counts_queries_whose_positive_is_in_the_top_k():
    ranks = [1, 2, 5, 11]
    assert hit_at_k(ranks, 1) == 0.25
    assert hit_at_k(ranks, 5) == 0.75
    assert hit_at_k(ranks, 10) == 0.75
    assert hit_at_k(ranks, 11) == 1.0


def test_mrr_averages_reciprocal_ranks():
    assert mrr([1, 2, 4]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert mrr([np.inf, 1]) == 0.5  # a positive beyond a search depth contributes nothing


def test_ndcg_with_one_relevant_candidate():
    # rank 1 -> 1, rank 3 -> 1/log2(4) = 0.5, rank 6 (beyond 5) -> 0
    assert ndcg_at_k([1, 3, 6], 5) == pytest.approx((1 + 0.5 + 0) / 3)


def test_ndcg_with_several_relevant_candidates():
    # Relevant at ranks 1 and 3: DCG = 1 + 0.5; ideal (ranks 1, 2) = 1 + 1/log2(3).
    expected = 1.5 / (1 + 1 / math.log2(3))
    assert ndcg_at_k_multi([[1, 3]], 10) == pytest.approx(expected)
    # Only the top k counts in both DCG and the ideal: with k = 1, relevant at 2 and 3 gives 0.
    assert ndcg_at_k_multi([[2, 3]], 1) == 0.0
    assert ndcg_at_k_multi([[1, 2]], 10) == pytest.approx(1.0)


def test_recall_with_several_relevant_candidates():
    assert recall_at_k_multi([[1, 7], [2, 3]], 5) == pytest.approx((0.5 + 1.0) / 2)


def test_pairwise_accuracy_counts_a_tie_as_a_miss():
    assert pairwise_accuracy(np.array([0.9, 0.5, 0.3]), np.array([0.1, 0.5, 0.4])) == pytest.approx(1 / 3)


def test_bad_ranks_are_rejected():
    with pytest.raises(ValueError, match="1-based"):
        hit_at_k([0, 1], 1)
    with pytest.raises(ValueError, match="no nDCG"):
        ndcg_at_k_multi([[]], 5)
    assert hit_at_k([], 1) == 0.0


def test_graded_ndcg_uses_linear_gains():
    # Gains 2 (at position 2) and 1 (at position 1): DCG = 1/log2(2) + 2/log2(3); ideal = 2/log2(2) + 1/log2(3).
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ndcg_at_k_multi([[2, 1]], 5, gains=[[2.0, 1.0]]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="gains for"):
        ndcg_at_k_multi([[1, 2]], 5, gains=[[1.0]])
