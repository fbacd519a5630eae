"""Ranking metrics, as the benchmarks report them, from the ranks of relevant candidates.

A rank is 1-based: rank 1 is the top of the list. MMEB (one positive per query) reports precision@1, which is
`hit_at_k(ranks, 1)`; MMEB-V2 adds hit@k, nDCG@5 and MRR. Image-text retrieval with several relevant captions
per image (Flickr30K, MS-COCO) counts a query as found at k when any relevant candidate is in its top k, which
is `hit_at_k` of each query's best relevant rank. Every function returns a float in [0, 1] (0.0 for no queries).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_ranks(ranks: Sequence[float] | np.ndarray) -> np.ndarray:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be one rank per query (1-d), got shape {ranks.shape}")
    if np.any(ranks < 1):
        raise ValueError("ranks are 1-based: every rank must be >= 1")
    return ranks


def hit_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """Share of queries whose (best) relevant candidate ranks in the top `k` (precision@1 for k = 1, recall@k)."""
    ranks = _as_ranks(ranks)
    return float(np.mean(ranks <= k)) if len(ranks) else 0.0


def mrr(ranks: Sequence[float] | np.ndarray) -> float:
    """Mean reciprocal rank of each query's (best) relevant candidate."""
    ranks = _as_ranks(ranks)
    return float(np.mean(1.0 / ranks)) if len(ranks) else 0.0


def ndcg_at_k(ranks: Sequence[float] | np.ndarray, k: int) -> float:
    """nDCG@k with one relevant candidate per query: 1 / log2(rank + 1) inside the top k, else 0."""
    ranks = _as_ranks(ranks)
    if not len(ranks):
        return 0.0
    gains = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    return float(np.mean(gains))


def ndcg_at_k_multi(
    relevant_ranks: Sequence[Sequence[float]], k: int, *, gains: Sequence[Sequence[float]] | None = None
) -> float:
    """nDCG@k with any number of relevant candidates per query, binary or graded ("linear" gains).

    Args:
        relevant_ranks: for each query, the 1-based positions of all its relevant candidates in its ranked list
            (not only the top k: the ideal DCG counts every relevant candidate up to k).
        k: the cut-off.
        gains: for each query, the relevance of each of those candidates (default 1 each); DCG adds
            gain / log2(position + 1), as MMEB-V2's `ndcg_linear` and BEIR do.
    """
    if not len(relevant_ranks):
        return 0.0
    scores = []
    for index, ranks in enumerate(relevant_ranks):
        ranks = _as_ranks(ranks)
        if not len(ranks):
            raise ValueError("a query without relevant candidates has no nDCG")
        gain = np.ones(len(ranks)) if gains is None else np.asarray(gains[index], dtype=np.float64)
        if gain.shape != ranks.shape:
            raise ValueError(f"query {index}: {len(gain)} gains for {len(ranks)} relevant candidates")
        dcg = float(np.sum(np.where(ranks <= k, gain / np.log2(ranks + 1.0), 0.0)))
        best = np.sort(gain)[::-1][:k]
        ideal = float(np.sum(best / np.log2(np.arange(1, len(best) + 1) + 1.0)))
        scores.append(dcg / ideal)
    return float(np.mean(scores))


def recall_at_k_multi(relevant_ranks: Sequence[Sequence[int]], k: int) -> float:
    """Share of each query's relevant candidates found in its top k, averaged over queries (TREC recall@k)."""
    if not len(relevant_ranks):
        return 0.0
    return float(np.mean([np.mean(_as_ranks(ranks) <= k) for ranks in relevant_ranks]))


def pairwise_accuracy(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Share of pairs where the positive scores strictly higher than its negative (SugarCrepe); a tie is a miss."""
    positive_scores, negative_scores = np.asarray(positive_scores), np.asarray(negative_scores)
    if positive_scores.shape != negative_scores.shape:
        raise ValueError(f"score shapes differ: {positive_scores.shape} vs {negative_scores.shape}")
    return float(np.mean(positive_scores > negative_scores)) if positive_scores.size else 0.0
