"""A light in-training evaluation: query -> positive retrieval recall over a held-out set of examples.

The full benchmark harness lives in `unime.eval`; this hook only tracks progress while training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from unime.data.schema import TrainExample
from unime.metrics import hit_at_k, mrr, ndcg_at_k
from unime.multi_vector import maxsim_scores


def retrieval_recall(
    embedder,
    examples: Sequence[TrainExample],
    *,
    batch_size: int = 32,
    truncate_dim: int | None = None,
    multi_vector: bool = False,
) -> dict[str, float]:
    """Recall@1 and @5 of each query's own positive among all positives of `examples`, and hard-negative accuracy.

    `hard_negative_accuracy` is the share of (query, mined negative) pairs where the positive scores higher than
    the negative: it measures fine-grained discrimination that in-batch recall can miss. `truncate_dim` scores
    the first dims of every embedding only (a matryoshka truncation, as `Embedder.encode` makes it).
    `multi_vector` scores every pair by MaxSim of the multi-vector head's token matrices instead (what a
    late-interaction run trains); the metrics are the same.
    """
    scores = held_out_scores(
        embedder, examples, batch_size=batch_size, truncate_dim=truncate_dim, multi_vector=multi_vector
    )
    ranks = _own_positive_ranks(scores.positives)  # [N]
    metrics = {"recall@1": float((ranks < 1).float().mean()), "recall@5": float((ranks < 5).float().mean())}
    if len(scores.negatives):
        own = scores.positives.diag()[scores.owners]  # [P] the owner's positive score beside each negative
        metrics["hard_negative_accuracy"] = int((scores.negatives < own).sum()) / len(scores.negatives)
    return metrics


@dataclass
class HeldOutScores:
    """The scores `retrieval_recall` reads its metrics from."""

    positives: torch.Tensor
    """`[N, N]` query i against positive j."""
    negatives: torch.Tensor
    """`[P]` each (query, mined negative) pair's score, the examples' negatives in order."""
    owners: torch.Tensor
    """`[P]` the example (query) each negative belongs to."""


def held_out_scores(
    embedder,
    examples: Sequence[TrainExample],
    *,
    batch_size: int = 32,
    truncate_dim: int | None = None,
    multi_vector: bool = False,
) -> HeldOutScores:
    """Every query against every positive and against its own mined negatives: dot products of single vectors, or
    (`multi_vector`) MaxSim scores of token matrices (`unime.late_interaction.maxsim`)."""
    if multi_vector and truncate_dim is not None:
        raise ValueError("truncate_dim applies to single vectors; multi-vector token vectors are not truncated")
    embed = _embed_token_matrices if multi_vector else partial(_embed_sides, truncate_dim=truncate_dim)
    score = maxsim_scores if multi_vector else _dot_products
    q = embed(embedder, [e.query for e in examples], batch_size)  # [N, D] or N matrices [n_i, d]
    p = embed(embedder, [e.positive for e in examples], batch_size)  # [N, D] or N matrices [n_i, d]
    sides = [side for e in examples for side in e.negatives]
    negatives = embed(embedder, sides, batch_size) if sides else []  # [P, D] or P matrices [n_i, d]
    negative_scores, owners, start = [], [], 0
    for index, example in enumerate(examples):
        stop = start + len(example.negatives)
        if stop > start:
            negative_scores.append(score(q[index : index + 1], negatives[start:stop])[0])  # [K_i]
            owners += [index] * (stop - start)
        start = stop
    return HeldOutScores(
        positives=score(q, p),  # [N, N]
        negatives=torch.cat(negative_scores) if negative_scores else torch.empty(0),  # [P]
        owners=torch.tensor(owners, dtype=torch.long),  # [P]
    )


def _dot_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.T  # [n, m]


def reranked_recall(
    embedder,
    reranker,
    examples: Sequence[TrainExample],
    *,
    top_k: int = 10,
    fusion_weight: float | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Recall@1 of each query's own positive among all positives, before and after reranking the top K.

    The embedder shortlists `top_k` positives per query (as `retrieval_recall` ranks them), the reranker reorders
    the shortlist (`unime.retrieve_rerank.retrieve_then_rerank`, with optional score fusion); a positive the shortlist
    missed stays missed. `recall@k` is the ceiling reranking can reach.
    """
    from unime.retrieve_rerank import retrieve_then_rerank

    q = _embed_sides(embedder, [e.query for e in examples], batch_size)  # [N, D]
    p = _embed_sides(embedder, [e.positive for e in examples], batch_size)  # [N, D]
    ranked = retrieve_then_rerank(
        q,
        p,
        [e.query.to_dict() for e in examples],
        [e.positive.to_dict() for e in examples],
        reranker,
        top_k_candidates=top_k,
        fusion_weight=fusion_weight,
        batch_size=batch_size,
        show_progress_bar=False,
    )
    ranks = _own_positive_ranks(q @ p.T)  # [N]
    return {
        "recall@1": float((ranks < 1).float().mean()),
        f"recall@{top_k}": float((ranks < top_k).float().mean()),
        "reranked_recall@1": sum(r.indices[:1] == [i] for i, r in enumerate(ranked)) / len(examples),
    }


def _embed_sides(embedder, sides, batch_size: int, truncate_dim: int | None = None) -> torch.Tensor:
    """`[N, D]` embeddings of training-row sides, each with its own instruction, in eval mode."""
    was_training = embedder.training
    embedder.eval()
    try:
        return _encode(embedder, sides, [s.instruction for s in sides], batch_size, truncate_dim)
    finally:
        embedder.train(was_training)


def _own_positive_ranks(scores: torch.Tensor) -> torch.Tensor:
    """`[N]` how many of the N positives score above query i's own (0: its positive is first), from `[N, N]` scores
    of query i against positive j."""
    return (scores > scores.diag().unsqueeze(1)).sum(1)


def _embed_token_matrices(embedder, sides, batch_size: int) -> list[torch.Tensor]:
    """The multi-vector head's token matrices `[n_i, d]` of training-row sides (the tokens its mask keeps), each
    with its own instruction, in eval mode."""
    was_training = embedder.training
    embedder.eval()
    matrices = []
    try:
        with torch.inference_mode():
            for start in range(0, len(sides), batch_size):
                batch = sides[start : start + batch_size]
                features = embedder.tokenize(batch, [s.instruction for s in batch])
                vectors, mask = embedder.embed_multi_vector(features)  # [B, T, d], [B, T]
                vectors, mask = vectors.float().cpu(), mask.cpu()
                matrices += [vectors[row][mask[row]] for row in range(len(batch))]  # each [n_i, d]
    finally:
        embedder.train(was_training)
    return matrices


def _encode(embedder, inputs, instructions, batch_size: int, truncate_dim: int | None = None) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            features = embedder.tokenize(inputs[start : start + batch_size], instructions[start : start + batch_size])
            out.append(embedder.embed(features, truncate_dim=truncate_dim).float().cpu())
    return torch.cat(out)


def teacher_agreement(embedder, examples: Sequence[TrainExample], teacher_cache, *, batch_size: int = 32) -> float:
    """Spearman correlation between the student's and the teacher's query-positive similarities (all pairs).

    Stage 1 distils the teacher's similarity structure into the student: this measures how much of it arrived.
    """
    from unime.data.collator import distill_text

    was_training = embedder.training
    embedder.eval()
    try:
        q = _encode(embedder, [e.query for e in examples], [None] * len(examples), batch_size)
        p = _encode(embedder, [e.positive for e in examples], [None] * len(examples), batch_size)
    finally:
        embedder.train(was_training)
    tq = teacher_cache.lookup([distill_text(e, e.query) for e in examples])  # [N, Dt]
    tp = teacher_cache.lookup([distill_text(e, e.positive) for e in examples])  # [N, Dt]
    return spearman((q @ p.T).flatten(), (tq @ tp.T).flatten())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors (Pearson correlation of their ranks; ties broken by order)."""
    ranks = [
        torch.empty_like(x, dtype=torch.float64).scatter_(0, x.argsort(), torch.arange(len(x), dtype=torch.float64))
        for x in (a.double(), b.double())
    ]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def reranking_metrics(
    reranker,
    examples: Sequence[TrainExample],
    *,
    random_candidates: int = 8,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """nDCG@10, MRR and recall@1 of reranking each held-out query's shuffled candidate list.

    A query's list is its positive, its mined negatives and `random_candidates` other examples' positives, in
    a seeded random order (so an untrained reranker scores at chance). `random_mrr` is what a random order
    scores on the same lists, the chance line to read the others against.
    """
    rng = random.Random(seed)
    pairs, spans, positions = [], [], []
    for index, example in enumerate(examples):
        others = [e.positive for i, e in enumerate(examples) if i != index and e.positive != example.positive]
        candidates = [example.positive, *example.negatives, *rng.sample(others, min(random_candidates, len(others)))]
        order = list(range(len(candidates)))
        rng.shuffle(order)
        positions.append(order.index(0))  # where the positive landed
        spans.append((len(pairs), len(order)))
        pairs += [(example.query, candidates[i]) for i in order]
    was_training = reranker.training
    reranker.eval()
    logits = []
    try:
        with torch.inference_mode():
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start : start + batch_size]
                features = reranker.tokenize(batch, [q.instruction for q, _ in batch])
                logits.append(reranker(features).float().cpu())  # [b, 2]
    finally:
        reranker.train(was_training)
    logits = torch.cat(logits) if logits else torch.empty(0, 2)  # [P, 2]
    scores = logits[:, 1] - logits[:, 0]  # [P] log-odds: the same order as p(yes)
    ranks, chance = [], []
    for (start, size), position in zip(spans, positions, strict=True):
        group = scores[start : start + size]
        ranks.append(int((group >= group[position]).sum()))  # ties count against the positive
        chance.append(sum(1.0 / r for r in range(1, size + 1)) / size)
    return {
        "ndcg@10": ndcg_at_k(ranks, 10),
        "mrr": mrr(ranks),
        "recall@1": hit_at_k(ranks, 1),
        "random_mrr": sum(chance) / len(chance) if chance else 0.0,
    }
