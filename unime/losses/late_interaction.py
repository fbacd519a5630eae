"""Late-interaction contrastive loss: InfoNCE or UniME's hard-negative loss on MaxSim scores of token matrices.

The single-vector losses of `unime.losses.contrastive` score a query against candidates by a dot product; here a
query, its positive and its mined negatives are padded token matrices with masks (a multi-vector head's output),
scored by `unime.late_interaction.maxsim`. Everything else is theirs, not a copy: the candidates are the global
batch's positives then its mined negatives, gathered by `global_candidates` (with gradient for the local shard),
and the false-negative filter and k-hardest selection are `select_hard_negatives` applied to the MaxSim scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unime.distributed import gather_sizes
from unime.late_interaction import check_token_matrices, maxsim
from unime.losses.contrastive import global_candidates, hard_negative_cross_entropy


def _check_negatives(positive: torch.Tensor, negatives: torch.Tensor, negatives_mask: torch.Tensor | None) -> None:
    batch, _, dim = positive.shape
    if negatives.dim() != 4 or negatives.shape[0] != batch or negatives.shape[3] != dim:
        raise ValueError(
            f"late_interaction_loss expects negatives [batch, num_negatives, tokens, dim] matching positive "
            f"{tuple(positive.shape)}; got negatives {tuple(negatives.shape)}"
        )
    if negatives_mask is None or negatives_mask.shape != negatives.shape[:3] or negatives_mask.dtype != torch.bool:
        got = None if negatives_mask is None else (tuple(negatives_mask.shape), negatives_mask.dtype)
        raise ValueError(
            f"late_interaction_loss needs a boolean negatives_mask [batch, num_negatives, tokens] = "
            f"{tuple(negatives.shape[:3])}; got {got}"
        )
    empty = (~negatives_mask.any(dim=2)).nonzero().tolist()  # [[query, negative], ...] without a real token
    if empty:
        query, negative = empty[0]
        raise ValueError(f"negative {negative} of query {query} has no unmasked token ({len(empty)} such negatives)")


def _pad_tokens(tokens: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad `[..., L, D]` tokens and their `[..., L]` mask with masked zeros up to `length` tokens."""
    extra = length - tokens.shape[-2]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)  # [..., length, D], [..., length]


def late_interaction_candidates(
    positive: torch.Tensor,
    positive_mask: torch.Tensor,
    negatives: torch.Tensor | None,
    negatives_mask: torch.Tensor | None,
    *,
    gather: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token matrices every local query is scored against, their masks, and where the local positives sit.

    Positives and negatives (and, with `gather`, every rank's) are padded to one token length so that they can be
    stacked and gathered; each matrix is flattened to one row, so `global_candidates` orders and gathers them
    exactly as it does single vectors, and their masks go through it the same way.

    Args:
        positive: `[B, Lp, D]` this rank's positives; `positive_mask` `[B, Lp]`.
        negatives: `[B, K, Ln, D]` this rank's mined negatives, or None; `negatives_mask` `[B, K, Ln]`.
        gather: gather candidates from all ranks (a no-op without a process group).

    Returns:
        `candidates` `[C, L, D]` (all positives of the global batch in rank order, then all their negatives),
        `candidate_mask` `[C, L]`, and `positive_index` `[B]`, the row of each local query's own positive.
    """
    batch, _, dim = positive.shape
    length = max(positive.shape[1], 0 if negatives is None else negatives.shape[2])
    if gather:
        # gather_with_grad needs one trailing shape on every rank: pad to the longest matrix anywhere.
        length = max(gather_sizes(length, positive.device))
    positive, positive_mask = _pad_tokens(positive, positive_mask, length)  # [B, L, D], [B, L]
    flat_negatives = flat_negatives_mask = None
    if negatives is not None:
        negatives, negatives_mask = _pad_tokens(negatives, negatives_mask, length)  # [B, K, L, D], [B, K, L]
        flat_negatives = negatives.reshape(batch, negatives.shape[1], length * dim)  # [B, K, L*D]
        # Masks travel as 0/1 in the tokens' dtype: collectives and `cat` treat them like any other candidate row.
        flat_negatives_mask = negatives_mask.to(positive.dtype)  # [B, K, L]
    candidates, positive_index = global_candidates(
        positive.reshape(batch, length * dim), flat_negatives, gather=gather
    )  # [C, L*D], [B]
    candidate_mask, _ = global_candidates(positive_mask.to(positive.dtype), flat_negatives_mask, gather=gather)
    return candidates.view(-1, length, dim), candidate_mask > 0.5, positive_index  # [C, L, D], [C, L], [B]


def late_interaction_loss(
    query: torch.Tensor,
    query_mask: torch.Tensor,
    positive: torch.Tensor,
    positive_mask: torch.Tensor,
    negatives: torch.Tensor | None = None,
    negatives_mask: torch.Tensor | None = None,
    *,
    temperature: float = 0.02,
    margin: float = 0.1,
    k: int | None = 8,
    normalize: bool = True,
    gather: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Contrastive loss on exact MaxSim scores of each local query against the global batch's candidates.

    Each local query is scored by late interaction against every positive of the global batch and every mined
    negative (flattened), as `info_nce` does with single vectors. With `k` set, UniME's stage-2 rule follows: a
    candidate scoring above the query's own positive + margin is dropped as a false negative, and the loss is the
    cross-entropy of [s_pos, the k hardest remaining] / temperature (`unime_hard_negative_loss` on MaxSim scores);
    with `k=None` every candidate stays (InfoNCE, the ColBERT / ColPali in-batch loss).

    A MaxSim score is a sum over query tokens, so its scale grows with the query's length. `normalize` divides
    each query's scores by its number of real tokens: with L2-normalised tokens they then lie in [-1, 1] like
    cosines, and the temperature and margin keep the meaning they have in the single-vector losses.

    Args:
        query: `[B, Lq, D]` query token vectors of this rank, padded; `query_mask` `[B, Lq]` True for real tokens.
        positive: `[B, Lp, D]` positives' token vectors, row i for query i; `positive_mask` `[B, Lp]`.
        negatives: `[B, K, Ln, D]` mined negatives' token vectors, or None for in-batch negatives only;
            `negatives_mask` `[B, K, Ln]` (required with negatives).
        temperature: the softmax temperature the (normalised) scores are divided by.
        margin: the false-negative margin (ignored when `k` is None).
        k: the number of hard negatives per query, or None to keep every candidate.
        normalize: divide each query's MaxSim scores by its number of real tokens.
        gather: gather candidates from all ranks (then every rank must call the loss, as it holds collectives);
            False scores against this rank's candidates only.
        chunk_size: candidates per MaxSim chunk (see `maxsim`); it bounds memory and never changes the loss.

    Returns:
        A scalar, the cross-entropy averaged over the local queries.

    Raises:
        ValueError: for mismatched shapes, a non-boolean mask, a query, positive or negative with no real token
            (naming it), a non-positive temperature or k < 1.

    References:
        Khattab and Zaharia 2020, "ColBERT" (arXiv 2004.12832); Faysse et al. 2024, "ColPali" (arXiv 2407.01449);
        Gu et al. 2025, UniME (arXiv 2504.17432) for the false-negative filter and hard negatives.

    Related:
        `unime_hard_negative_loss` and `info_nce` are the same objectives on single vectors;
        `unime.late_interaction.maxsim` is the scoring on its own.
    """
    check_token_matrices("query", query, query_mask)
    check_token_matrices("positive", positive, positive_mask)
    if positive.shape[0] != query.shape[0] or positive.shape[2] != query.shape[2]:
        raise ValueError(
            f"late_interaction_loss expects one positive per query with the query's dim; got query "
            f"{tuple(query.shape)} and positive {tuple(positive.shape)}"
        )
    if negatives is not None:
        _check_negatives(positive, negatives, negatives_mask)
    elif negatives_mask is not None:
        raise ValueError("late_interaction_loss got a negatives_mask without negatives")
    if not temperature > 0:
        raise ValueError(f"late_interaction_loss needs a positive temperature, got {temperature}")
    if k is not None and k < 1:
        raise ValueError(f"late_interaction_loss needs k >= 1 (or None for every candidate), got {k}")
    candidates, candidate_mask, positive_index = late_interaction_candidates(
        positive, positive_mask, negatives, negatives_mask, gather=gather
    )  # [C, L, D], [C, L], [B]
    scores = maxsim(query, query_mask, candidates, candidate_mask, chunk_size=chunk_size)  # [B, C]
    if normalize:
        scores = scores / query_mask.sum(dim=1, keepdim=True).to(scores.dtype)  # [B, C]
    if k is None:
        return F.cross_entropy(scores / temperature, positive_index)
    return hard_negative_cross_entropy(scores, positive_index, temperature=temperature, margin=margin, k=k)


__all__ = ["late_interaction_candidates", "late_interaction_loss"]
