"""Ranks of relevant candidates from embeddings, with batched matrix products (faiss for large corpora).

Two shapes of benchmark:
- candidate lists (MMEB): each query has its own list of candidates (indices into a table of distinct
  candidates), the first one relevant. `candidate_list_ranks` scores each list with one batched product.
- a shared corpus (Flickr30K, MS-COCO, ...): every query ranks the whole corpus and may have several relevant
  entries. `corpus_ranks` computes each relevant entry's exact rank in chunks; above `faiss_min_corpus`
  entries it asks faiss for the top `faiss_depth` instead, and a relevant entry beyond it gets rank infinity
  (hit@k for k <= depth and MRR@depth stay exact).

Ties: a candidate with the same content as the relevant one is the same item and never counts against it;
a different candidate with an equal score ranks above it (a tie is a miss, so a collapsed model that gives
every input the same vector scores zero rather than everything).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_CHUNK_ELEMENTS = 1 << 24  # ~64 MB of float32 per chunk of gathered candidates or scores


def candidate_list_ranks(
    query_vectors: np.ndarray, candidate_vectors: np.ndarray, lists: Sequence[Sequence[int]]
) -> np.ndarray:
    """The 1-based rank of each query's first candidate within its own list.

    Args:
        query_vectors: `[Q, D]`, row i for query i.
        candidate_vectors: `[C, D]` distinct candidates.
        lists: for each query, indices into `candidate_vectors`; the first is the relevant one. Equal indices
            are the same item.

    Returns:
        `[Q]` float64 ranks.
    """
    queries = torch.as_tensor(np.asarray(query_vectors, dtype=np.float32))  # [Q, D]
    candidates = torch.as_tensor(np.asarray(candidate_vectors, dtype=np.float32))  # [C, D]
    if len(lists) != len(queries):
        raise ValueError(f"{len(lists)} candidate lists for {len(queries)} queries")
    if not len(lists):
        return np.zeros(0)
    longest = max(len(candidate_list) for candidate_list in lists)
    if min(len(candidate_list) for candidate_list in lists) < 1:
        raise ValueError("every query needs at least one candidate")
    padded = torch.full((len(lists), longest), -1, dtype=torch.long)  # [Q, L], -1 = padding
    for row, candidate_list in enumerate(lists):
        padded[row, : len(candidate_list)] = torch.as_tensor(list(candidate_list), dtype=torch.long)
    ranks = torch.empty(len(lists), dtype=torch.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, longest * queries.shape[1]))
    for start in range(0, len(lists), step):
        index = padded[start : start + step]  # [b, L]
        gathered = candidates[index.clamp(min=0)]  # [b, L, D]
        scores = torch.bmm(gathered, queries[start : start + step].unsqueeze(-1)).squeeze(-1)  # [b, L]
        other = (index >= 0) & (index != index[:, :1])  # [b, L] real candidates that are not the positive item
        beats = other & (scores >= scores[:, :1])  # [b, L]
        ranks[start : start + step] = 1 + beats.sum(dim=1).double()
    return ranks.numpy()


def corpus_ranks(
    query_vectors: np.ndarray,
    corpus_vectors: np.ndarray,
    relevant: Sequence[Sequence[int]],
    *,
    faiss_min_corpus: int = 100_000,
    faiss_depth: int = 100,
) -> list[np.ndarray]:
    """For each query, the 1-based ranks of its relevant corpus entries among the whole corpus.

    Args:
        query_vectors: `[Q, D]`.
        corpus_vectors: `[N, D]` distinct entries.
        relevant: for each query, the indices of its relevant entries (at least one).
        faiss_min_corpus: from this corpus size on, search with faiss (exact inner product) for the top
            `faiss_depth` entries instead of scoring all of them.
        faiss_depth: how deep the faiss search goes; relevant entries below it get rank `inf`.

    Returns:
        One float64 array per query, the ranks of its relevant entries in the order given.
    """
    if len(relevant) != len(query_vectors):
        raise ValueError(f"{len(relevant)} relevance lists for {len(query_vectors)} queries")
    if any(len(entries) == 0 for entries in relevant):
        raise ValueError("every query needs at least one relevant corpus entry")
    if len(corpus_vectors) >= faiss_min_corpus:
        return _faiss_ranks(query_vectors, corpus_vectors, relevant, faiss_depth)
    queries = torch.as_tensor(np.asarray(query_vectors, dtype=np.float32))  # [Q, D]
    corpus = torch.as_tensor(np.asarray(corpus_vectors, dtype=np.float32))  # [N, D]
    out: list[np.ndarray] = []
    step = max(1, _CHUNK_ELEMENTS // max(1, len(corpus)))
    for start in range(0, len(queries), step):
        scores = queries[start : start + step] @ corpus.T  # [b, N]
        for offset, row in enumerate(scores):
            entries = torch.as_tensor(list(relevant[start + offset]), dtype=torch.long)  # [r]
            own = row[entries]  # [r]
            # Each relevant entry is ranked against the irrelevant entries only (the other relevant ones are
            # not competitors), so a query with 5 relevant captions has 5 ranks in 1..N-4.
            irrelevant = torch.ones(len(corpus), dtype=torch.bool)  # [N]
            irrelevant[entries] = False
            ahead = (row[irrelevant].unsqueeze(0) >= own.unsqueeze(1)).sum(dim=1)  # [r]
            out.append(1 + ahead.double().numpy())
    return out


def _faiss_ranks(
    query_vectors: np.ndarray, corpus_vectors: np.ndarray, relevant: Sequence[Sequence[int]], depth: int
) -> list[np.ndarray]:
    import faiss

    corpus = np.ascontiguousarray(corpus_vectors, dtype=np.float32)  # [N, D]
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)  # [Q, D]
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    depth = min(depth, len(corpus))
    _, top = index.search(queries, depth)  # [Q, depth] corpus indices, best first
    out = []
    for row, entries in zip(top, relevant, strict=True):
        wanted = set(int(entry) for entry in entries)
        ranks, irrelevant_seen = {}, 0
        for index_in_corpus in row.tolist():
            if index_in_corpus in wanted:
                ranks[index_in_corpus] = irrelevant_seen + 1
            else:
                irrelevant_seen += 1
        out.append(np.array([float(ranks.get(int(entry), np.inf)) for entry in entries]))
    return out


def positions_in_list(ranks_among_irrelevant: np.ndarray) -> np.ndarray:
    """Positions of a query's relevant entries in its full ranked list, from their ranks among irrelevant ones.

    `corpus_ranks` ranks each relevant entry against the irrelevant entries only; in the full list the
    relevant entries ranked above it push it down too: the m-th best (0-based) sits at its rank + m. Returned
    in the order given (an entry beyond a faiss search depth stays at infinity).
    """
    ranks = np.asarray(ranks_among_irrelevant, dtype=np.float64)
    order = np.argsort(ranks, kind="stable")
    positions = np.empty_like(ranks)
    positions[order] = ranks[order] + np.arange(len(ranks))
    return positions
