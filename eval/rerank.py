"""Reranking: rerank a first stage's top-K and report nDCG@10, MRR and recall@1 before and after.

The first stage is an embedder (any `Encoder`) ranking each query's candidate list of an MMEB-layout dataset;
the reranker is anything with sentence-transformers' CrossEncoder `predict(pairs, batch_size=...,
show_progress_bar=...) -> scores` (higher = more relevant), such as `unime.Reranker` or a
`sentence_transformers.CrossEncoder`. A query or document goes to `predict` as a str (text), a PIL image, or a
`{"text", "image"}` dict (both).

The reranked order of the top K is by the reranker's score, or, with `fusion_weight` w, by first-stage score +
w * reranker score. A positive outside the top K keeps its first-stage rank (it is below every reranked
candidate). Each distinct (query, candidate) pair is scored once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from unime.eval.embedding import EmbedStats, embed_distinct
from unime.eval.encoders import Encoder, EncoderError
from unime.eval.items import Item
from unime.eval.metrics import hit_at_k, mrr, ndcg_at_k
from unime.eval.mmeb import MMEBDataset


@runtime_checkable
class PairScorer(Protocol):
    """sentence-transformers' CrossEncoder `predict` shape: higher scores = more relevant."""

    def predict(
        self, pairs: list[tuple[Any, Any]], batch_size: int = 32, show_progress_bar: bool | None = None
    ) -> Any: ...


def reranker_input(item: Item) -> Any:
    """An item as a reranker takes it: a str, a PIL image, or a `{"text", "image"}` dict."""
    if item.image is None:
        return item.text
    with Image.open(item.image) as opened:
        image = opened.convert("RGB")
    return image if item.text is None else {"text": item.text, "image": image}


def rerank_top_k(
    first_stage: Sequence[np.ndarray],
    lists: Sequence[Sequence[int]],
    pair_scores: dict[tuple[int, int], float],
    query_rows: Sequence[int],
    *,
    top_k: int,
    fusion_weight: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of each list's first candidate before and after reranking its top K.

    Args:
        first_stage: per query, the first-stage scores of its list (same order as `lists`).
        lists: per query, candidate ids, positive first (equal ids are the same item).
        pair_scores: reranker score of each (query row, candidate id) in a top K.
        query_rows: per list, its query's row (the key into `pair_scores`).
        top_k: how many first-stage candidates are reranked.
        fusion_weight: None: order the top K by reranker score; w: by first-stage + w * reranker score.

    Returns:
        `[Q]` ranks before and `[Q]` ranks after (1-based; ties count against the positive).
    """
    before, after = [], []
    for scores, candidates, query in zip(first_stage, lists, query_rows, strict=True):
        candidates = np.asarray(candidates)
        others = candidates != candidates[0]
        rank_before = 1 + int(np.sum(others & (scores >= scores[0])))
        before.append(rank_before)
        order = np.argsort(-scores, kind="stable")
        # The top K by first-stage score; the positive (or a copy of it) is inside when its rank is <= K.
        top = order[:top_k]
        if rank_before > top_k:
            after.append(rank_before)
            continue
        top = [position for position in top if candidates[position] != candidates[0]] + [0]
        reranked = np.array([pair_scores[(query, int(candidates[position]))] for position in top])
        if fusion_weight is not None:
            reranked = np.array([scores[position] for position in top]) + fusion_weight * reranked
        after.append(1 + int(np.sum(reranked[:-1] >= reranked[-1])))
    return np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)


def run_rerank(
    encoder: Encoder,
    reranker: PairScorer,
    dataset: MMEBDataset,
    *,
    top_k: int = 10,
    fusion_weight: float | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], EmbedStats]:
    """First-stage retrieval with `encoder`, reranking of each query's top K with `reranker`, metrics of both."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    stats = EmbedStats()
    queries, query_stats = embed_distinct(
        encoder,
        dataset.queries.items,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=f"{dataset.name} queries" if progress else None,
    )
    candidates, candidate_stats = embed_distinct(
        encoder,
        dataset.candidates.items,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=f"{dataset.name} candidates" if progress else None,
    )
    stats.add(query_stats)
    stats.add(candidate_stats)
    first_stage = [
        candidates[np.asarray(candidate_list)] @ queries[query]  # [L]
        for query, candidate_list in zip(dataset.query_rows, dataset.lists, strict=True)
    ]
    wanted: dict[tuple[int, int], None] = {}
    for scores, candidate_list, query in zip(first_stage, dataset.lists, dataset.query_rows, strict=True):
        for position in np.argsort(-scores, kind="stable")[:top_k]:
            wanted[(query, candidate_list[position])] = None
    pairs = list(wanted)
    inputs = [
        (reranker_input(dataset.queries.items[query]), reranker_input(dataset.candidates.items[candidate]))
        for query, candidate in pairs
    ]
    predicted = np.asarray(
        reranker.predict(inputs, batch_size=batch_size, show_progress_bar=progress), dtype=np.float64
    )
    if predicted.shape != (len(pairs),):
        raise EncoderError(
            f"the reranker returned shape {predicted.shape} for {len(pairs)} pairs; expected one score each"
        )
    pair_scores = dict(zip(pairs, predicted.tolist(), strict=True))
    before, after = rerank_top_k(
        first_stage, dataset.lists, pair_scores, dataset.query_rows, top_k=top_k, fusion_weight=fusion_weight
    )

    def metrics(ranks: np.ndarray) -> dict[str, float]:
        return {"ndcg@10": ndcg_at_k(ranks, 10), "mrr": mrr(ranks), "recall@1": hit_at_k(ranks, 1)}

    return {
        "task": "rerank",
        "dataset": dataset.name,
        "queries": len(before),
        "top_k": top_k,
        "fusion_weight": fusion_weight,
        "pairs_scored": len(pairs),
        "scores": {
            **{f"before/{k}": v for k, v in metrics(before).items()},
            **{f"after/{k}": v for k, v in metrics(after).items()},
        },
        "skipped": dataset.skipped.to_dict(),
    }, stats
