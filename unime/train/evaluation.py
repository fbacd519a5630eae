"""A light in-training evaluation: query -> positive retrieval recall over a held-out set of examples.

The full benchmark harness lives in `unime.eval`; this hook only tracks progress while training.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from unime.data.schema import TrainExample
from unime.metrics import hit_at_k, mrr, ndcg_at_k


def retrieval_recall(
    embedder, examples: Sequence[TrainExample], *, batch_size: int = 32, truncate_dim: int | None = None
) -> dict[str, float]:
    """Recall@1 and @5 of each query's own positive among all positives of `examples`, and hard-negative accuracy.

    `hard_negative_accuracy` is the share of (query, mined negative) pairs where the positive scores higher than
    the negative: it measures fine-grained discrimination that in-batch recall can miss. `truncate_dim` scores
    the first dims of every embedding only (a matryoshka truncation, as `Embedder.encode` makes it).
    """
    q = _embed_sides(embedder, [e.query for e in examples], batch_size, truncate_dim)  # [N, D]
    p = _embed_sides(embedder, [e.positive for e in examples], batch_size, truncate_dim)  # [N, D]
    ranks = _own_positive_ranks(q, p)  # [N]
    metrics = {"recall@1": float((ranks < 1).float().mean()), "recall@5": float((ranks < 5).float().mean())}
    pairs = [(i, side) for i, e in enumerate(examples) for side in e.negatives]
    if pairs:
        n = _embed_sides(embedder, [side for _, side in pairs], batch_size, truncate_dim)  # [P, D]
        owners = torch.tensor([i for i, _ in pairs])
        negative_scores = (q[owners] * n).sum(-1)  # [P]
        wins = int((negative_scores < (q * p).sum(-1)[owners]).sum())
        metrics["hard_negative_accuracy"] = wins / len(pairs)
    return metrics


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
    ranks = _own_positive_ranks(q, p)  # [N]
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


def _own_positive_ranks(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`[N]` how many of the N positives score above query i's own (0: its positive is first)."""
    scores = q @ p.T  # [N, N]
    return (scores > scores.diag().unsqueeze(1)).sum(1)


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
