"""A light in-training evaluation: query -> positive retrieval recall over a held-out set of examples.

The full benchmark harness lives in `unime.eval`; this hook only tracks progress while training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unime.data.schema import TrainExample


def retrieval_recall(embedder, examples: Sequence[TrainExample], *, batch_size: int = 32) -> dict[str, float]:
    """Recall@1 and @5 of each query's own positive among all positives of `examples`, and hard-negative accuracy.

    `hard_negative_accuracy` is the share of (query, mined negative) pairs where the positive scores higher than
    the negative: it measures fine-grained discrimination that in-batch recall can miss.
    """
    queries = [e.query.as_input() for e in examples]
    positives = [e.positive.as_input() for e in examples]
    was_training = embedder.training
    embedder.eval()
    try:
        q = _encode(embedder, queries, [e.query.instruction for e in examples], batch_size)  # [N, D]
        p = _encode(embedder, positives, [e.positive.instruction for e in examples], batch_size)  # [N, D]
        pairs = [(i, side) for i, e in enumerate(examples) for side in e.negatives]
        wins = 0
        if pairs:
            n = _encode(embedder, [s.as_input() for _, s in pairs], [s.instruction for _, s in pairs], batch_size)
            owners = torch.tensor([i for i, _ in pairs])
            negative_scores = (q[owners] * n).sum(-1)  # [P]
            wins = int((negative_scores < (q * p).sum(-1)[owners]).sum())
    finally:
        embedder.train(was_training)
    scores = q @ p.T  # [N, N]
    ranks = (scores > scores.diag().unsqueeze(1)).sum(1)  # [N] how many candidates beat the own positive
    metrics = {"recall@1": float((ranks < 1).float().mean()), "recall@5": float((ranks < 5).float().mean())}
    if pairs:
        metrics["hard_negative_accuracy"] = wins / len(pairs)
    return metrics


def _encode(embedder, inputs, instructions, batch_size: int) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            features = embedder.tokenize(inputs[start : start + batch_size], instructions[start : start + batch_size])
            out.append(embedder.embed(features).float().cpu())
    return torch.cat(out)


def teacher_agreement(embedder, examples: Sequence[TrainExample], teacher_cache, *, batch_size: int = 32) -> float:
    """Spearman correlation between the student's and the teacher's query-positive similarities (all pairs).

    Stage 1 distils the teacher's similarity structure into the student: this measures how much of it arrived.
    """
    from unime.data.collator import distill_text

    was_training = embedder.training
    embedder.eval()
    try:
        q = _encode(embedder, [e.query.as_input() for e in examples], [None] * len(examples), batch_size)
        p = _encode(embedder, [e.positive.as_input() for e in examples], [None] * len(examples), batch_size)
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
