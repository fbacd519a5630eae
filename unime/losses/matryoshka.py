"""Matryoshka wrapper: apply any loss to several leading slices of the embeddings at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def truncate_and_normalize(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """Keep the first `dim` features of the last axis and rescale to unit L2 norm (what a truncated vector is
    used as at inference; see `unime.pooling.finish_embeddings`)."""
    return F.normalize(embeddings[..., :dim], p=2, dim=-1)  # [..., dim]


def matryoshka_loss(
    loss_fn: Callable[..., torch.Tensor],
    dims: Sequence[int],
    *,
    weights: Sequence[float] | None = None,
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """Weighted sum of `loss_fn` over truncated, renormalised embeddings, one term per matryoshka dimension.

    Training every leading slice at once makes the first d features a usable embedding on their own, so a saved
    model can serve smaller vectors (its `unime_config.json` lists the dims) without retraining.

    Args:
        loss_fn: a loss called as `loss_fn(query, positive, negatives, **loss_kwargs)`, e.g. `info_nce`,
            `unime_hard_negative_loss` or `soft_label_kl` (pass its `teacher_scores` through `loss_kwargs`).
        dims: the leading dimensions to train, each in 1..D; include D to keep training the full vector.
        weights: one weight per entry of `dims`; None weighs each term 1.
        query: `[B, D]` query embeddings.
        positive: `[B, D]` positive embeddings.
        negatives: `[B, K, D]` negative embeddings, or None.
        **loss_kwargs: passed to `loss_fn` unchanged (temperature, margin, teacher_scores, ...).

    Returns:
        A scalar, sum over d of weight_d * loss_fn(truncated inputs).

    References:
        Kusupati et al. 2022, "Matryoshka Representation Learning" (arXiv 2205.13147); sentence-transformers'
        `MatryoshkaLoss`.

    Related:
        `unime.pooling.finish_embeddings(truncate_dim=...)` truncates the same way at inference.
    """
    full_dim = query.shape[-1]
    dims = list(dims)
    if not dims:
        raise ValueError("matryoshka_loss needs at least one dimension in dims")
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= full_dim:
            raise ValueError(f"matryoshka_loss dims must be integers in 1..{full_dim} (the embedding size); got {dims}")
    if len(set(dims)) != len(dims):
        raise ValueError(f"matryoshka_loss dims must not repeat; got {dims}")
    weights = [1.0] * len(dims) if weights is None else list(weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_loss needs one weight per dim; got dims {dims} and weights {weights}")
    total = query.new_zeros(())
    for dim, weight in zip(dims, weights, strict=True):
        loss = loss_fn(
            truncate_and_normalize(query, dim),  # [B, d]
            truncate_and_normalize(positive, dim),  # [B, d]
            None if negatives is None else truncate_and_normalize(negatives, dim),  # [B, K, d]
            **loss_kwargs,
        )
        total = total + weight * loss
    return total
