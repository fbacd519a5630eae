"""Retrieve, then rerank: an embedder's top-K per query, reordered by a reranker.

One function for every consumer (the evaluation harness, the server, the quickstart), so that "retrieve then
rerank" means the same thing everywhere. The reranker is anything with sentence-transformers' CrossEncoder
`predict(pairs, batch_size=..., show_progress_bar=...)`: unime's `Reranker` or a `CrossEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


class PairScorer(Protocol):
    """What a reranker must offer: one relevance score per (query, document) pair, higher is more relevant."""

    def predict(self, pairs: list[tuple[Any, Any]], *, batch_size: int = 32, show_progress_bar: bool | None = None):
        """Scores `[len(pairs)]` (numpy array or list)."""
        ...


@dataclass
class RankedCandidates:
    """One query's reranked shortlist, best first."""

    indices: list[int]
    """Candidate indices (into the corpus), in the final order."""
    scores: list[float]
    """Final score of each: the rerank score, or retrieval + w * rerank with fusion."""
    retrieval_scores: list[float]
    """The first stage's similarity of each."""
    rerank_scores: list[float]
    """The reranker's score of each."""


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` best candidates per query of a `[Q, C]` score matrix: values and indices `[Q, min(k, C)]`.

    Ties keep the lower index first, so the shortlist does not depend on the sort's internals.
    """
    k = min(k, scores.shape[1])
    # A stable descending sort: equal scores stay in index order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # [Q, k]
    return scores.gather(1, order), order


def retrieve_then_rerank(
    query_embeddings: torch.Tensor | np.ndarray,
    candidate_embeddings: torch.Tensor | np.ndarray,
    queries: Sequence[Any],
    candidates: Sequence[Any],
    reranker: PairScorer,
    *,
    top_k_candidates: int = 50,
    fusion_weight: float | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> list[RankedCandidates]:
    """Shortlist each query's `top_k_candidates` by embedding similarity, then reorder them with `reranker`.

    Args:
        query_embeddings: `[Q, D]`, normalised if the model's similarity is cosine.
        candidate_embeddings: `[C, D]`, the corpus.
        queries, candidates: the inputs the embeddings came from (what the reranker reads).
        reranker: see `PairScorer`.
        top_k_candidates: shortlist size (LamRA reranks the top 50; the reranking paper the top 25-100).
        fusion_weight: None ranks by the rerank score alone; `w` ranks by retrieval + w * rerank (LamRA fuses
            this way with w between 0.1 and 1).
        batch_size, show_progress_bar: passed to the reranker.

    Returns:
        One `RankedCandidates` per query, in query order.
    """
    q = torch.as_tensor(np.asarray(query_embeddings), dtype=torch.float32)  # [Q, D]
    c = torch.as_tensor(np.asarray(candidate_embeddings), dtype=torch.float32)  # [C, D]
    if len(q) != len(queries) or len(c) != len(candidates):
        raise ValueError(
            f"{len(q)} query embeddings for {len(queries)} queries, {len(c)} candidate embeddings for "
            f"{len(candidates)} candidates: they must match"
        )
    return rerank_shortlists(
        q @ c.T,  # [Q, C]
        queries,
        candidates,
        reranker,
        top_k_candidates=top_k_candidates,
        fusion_weight=fusion_weight,
        batch_size=batch_size,
        show_progress_bar=show_progress_bar,
    )


def rerank_shortlists(
    retrieval_scores: torch.Tensor,
    queries: Sequence[Any],
    candidates: Sequence[Any],
    reranker: PairScorer,
    *,
    top_k_candidates: int = 50,
    fusion_weight: float | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
) -> list[RankedCandidates]:
    """`retrieve_then_rerank` from any first stage's `[Q, C]` scores (cosine of single vectors, MaxSim of token
    matrices): each query's `top_k_candidates` by those scores, reordered by `reranker` (fused as there)."""
    if tuple(retrieval_scores.shape) != (len(queries), len(candidates)):
        raise ValueError(
            f"retrieval scores of shape {tuple(retrieval_scores.shape)} for {len(queries)} queries and "
            f"{len(candidates)} candidates: expected ({len(queries)}, {len(candidates)})"
        )
    retrieval, shortlist = top_k(retrieval_scores.float(), top_k_candidates)  # [Q, k] each
    pairs = [(queries[i], candidates[j]) for i, row in enumerate(shortlist.tolist()) for j in row]
    if not pairs:
        return [RankedCandidates([], [], [], []) for _ in queries]
    rerank = np.asarray(
        reranker.predict(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar), dtype=np.float64
    ).reshape(shortlist.shape)  # [Q, k]
    results = []
    for i in range(len(queries)):
        first = retrieval[i].double().numpy()
        final = rerank[i] if fusion_weight is None else first + fusion_weight * rerank[i]
        order = np.argsort(-final, kind="stable")  # stable: ties keep the retrieval order
        results.append(
            RankedCandidates(
                indices=[int(shortlist[i, j]) for j in order],
                scores=[float(final[j]) for j in order],
                retrieval_scores=[float(first[j]) for j in order],
                rerank_scores=[float(rerank[i, j]) for j in order],
            )
        )
    return results
