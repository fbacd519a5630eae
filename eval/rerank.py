"""Reranking: rerank a first stage's top-K and report nDCG@10, MRR and recall@1 before and after.

The first stage is an embedder (any `Encoder`) ranking each query's candidate list of an MMEB-layout dataset;
the reranker is anything with sentence-transformers' CrossEncoder `predict(pairs, batch_size=...,
show_progress_bar=...) -> scores` (higher = more relevant), such as `unime.Reranker` or a
`sentence_transformers.CrossEncoder`. A query or document goes to `predict` as a str (text), a PIL image, or a
`{"text", "image"}` dict (both).

Each query's list goes through `unime.retrieve_rerank.retrieve_then_rerank` (the one retrieve-then-rerank of the
toolkit, shared with the server): its top K by embedding similarity, reordered by the reranker's score or, with
`fusion_weight` w, by first-stage score + w * reranker score (ties keep the first-stage order). A positive
outside the top K keeps its first-stage rank (below every reranked candidate). Before reranking, ties count
against the positive, as in the MMEB task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from unime.eval.embed_sets import embed_sets
from unime.eval.embedding import EmbedStats
from unime.eval.encoders import Encoder
from unime.eval.mmeb import MMEBDataset
from unime.inputs import Input
from unime.metrics import hit_at_k, mrr, ndcg_at_k
from unime.retrieve_rerank import PairScorer, retrieve_then_rerank


def reranker_input(item: Input) -> Any:
    """An item as a reranker takes it: a str, a PIL image, or a `{"text", "image"}` dict."""
    if item.image is None:
        return item.text
    with Image.open(item.image) as opened:
        image = opened.convert("RGB")
    return image if item.text is None else {"text": item.text, "image": image}


class _LazyInputs(Sequence):
    """A candidate list as reranker inputs, each read (images decoded) only when the reranker needs it."""

    def __init__(self, items: Sequence[Input]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        return reranker_input(self.items[index])


def rank_after_rerank(reranked: Sequence[int], candidate_ids: Sequence[int], rank_before: int, top_k: int) -> int:
    """The positive's rank after reranking: its place in the reranked shortlist, else its first-stage rank.

    Args:
        reranked: positions in the candidate list, in the reranked order (the shortlist).
        candidate_ids: the list's candidate ids, positive first (equal ids are the same item).
        rank_before: the positive's first-stage rank.
        top_k: the shortlist size; a positive outside it ranks below every shortlisted candidate.
    """
    for place, position in enumerate(reranked):
        if candidate_ids[position] == candidate_ids[0]:
            return place + 1
    return max(rank_before, top_k + 1)


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
    vectors, stats = embed_sets(
        encoder,
        {"queries": dataset.queries.items, "candidates": dataset.candidates.items},
        dataset=dataset.name,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    queries, candidates = vectors["queries"], vectors["candidates"]
    before, after, pairs_scored = [], [], 0
    lists = zip(dataset.query_rows, dataset.lists, strict=True)
    for query, candidate_list in tqdm(
        lists, total=len(dataset.lists), desc=f"{dataset.name} rerank", disable=not progress
    ):
        ids = np.asarray(candidate_list)
        vectors = candidates[ids]  # [L, D]
        scores = vectors @ queries[query]  # [L]
        rank_before = 1 + int(np.sum((ids != ids[0]) & (scores >= scores[0])))
        (ranked,) = retrieve_then_rerank(
            queries[query][None],  # [1, D]
            vectors,
            [reranker_input(dataset.queries.items[query])],
            _LazyInputs([dataset.candidates.items[i] for i in candidate_list]),
            reranker,
            top_k_candidates=top_k,
            fusion_weight=fusion_weight,
            batch_size=batch_size,
            show_progress_bar=False,
        )
        pairs_scored += len(ranked.indices)
        before.append(rank_before)
        after.append(rank_after_rerank(ranked.indices, candidate_list, rank_before, top_k))

    def metrics(ranks: list[int]) -> dict[str, float]:
        return {"ndcg@10": ndcg_at_k(ranks, 10), "mrr": mrr(ranks), "recall@1": hit_at_k(ranks, 1)}

    return {
        "task": "rerank",
        "dataset": dataset.name,
        "queries": len(before),
        "top_k": top_k,
        "fusion_weight": fusion_weight,
        "pairs_scored": pairs_scored,
        "scores": {
            **{f"before/{k}": v for k, v in metrics(before).items()},
            **{f"after/{k}": v for k, v in metrics(after).items()},
        },
        "skipped": dataset.skipped.to_dict(),
    }, stats
