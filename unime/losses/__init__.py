"""Training losses: pure functions of tensors, looked up by name from a recipe's config.

Each embedding loss takes L2-normalised `query [B, D]`, `positive [B, D]` and optional `negatives [B, K, D]` and
returns a scalar; any of them can be wrapped in `matryoshka_loss`. `late_interaction_loss` takes padded token
matrices with masks instead (a multi-vector head's output) and scores them by MaxSim. The reranker losses
(`rerank_*`) take answer logits `[B, 1 + N, 2]` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unime.losses.contrastive import global_candidates, info_nce, select_hard_negatives, unime_hard_negative_loss
from unime.losses.distill import similarity_kl
from unime.losses.late_interaction import late_interaction_loss
from unime.losses.matryoshka import matryoshka_loss, truncate_and_normalize
from unime.losses.rerank import rerank_contrastive_loss, rerank_sft_loss, unified_rerank_loss
from unime.losses.soft_label import soft_label_kl

LossFn = Callable[..., torch.Tensor]

LOSSES: dict[str, LossFn] = {
    "info_nce": info_nce,
    "unime_hard_negative": unime_hard_negative_loss,
    "soft_label_kl": soft_label_kl,
    # UniME stage 1; its signature differs: (query, positive, teacher_query, teacher_positive).
    "text_distill_kl": similarity_kl,
    # Rerankers: (logits [B, 1 + N, 2], ...).
    "rerank_sft": rerank_sft_loss,
    "rerank_contrastive": rerank_contrastive_loss,
    "rerank_unified": unified_rerank_loss,
    # Multi-vector: (query, query_mask, positive, positive_mask, negatives, negatives_mask) token matrices.
    "late_interaction": late_interaction_loss,
}
RERANK_LOSSES = frozenset({"rerank_sft", "rerank_contrastive", "rerank_unified"})


def get_loss(name: str) -> LossFn:
    """The loss function registered under `name`.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known losses: {sorted(LOSSES)}") from None


__all__ = [
    "LOSSES",
    "RERANK_LOSSES",
    "LossFn",
    "get_loss",
    "global_candidates",
    "info_nce",
    "late_interaction_loss",
    "matryoshka_loss",
    "rerank_contrastive_loss",
    "rerank_sft_loss",
    "select_hard_negatives",
    "soft_label_kl",
    "unified_rerank_loss",
    "similarity_kl",
    "truncate_and_normalize",
    "unime_hard_negative_loss",
]
