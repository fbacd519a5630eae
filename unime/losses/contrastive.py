"""Contrastive losses over a global batch: plain InfoNCE and UniME's hard-negative loss.

Both score each *local* query against candidates gathered from every rank (all positives, then all mined negatives)
with `unime.distributed.gather_with_grad`, so the loss averaged across ranks by DDP has exactly the gradients of one
process on the concatenated batch. Inputs are L2-normalised embeddings, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unime.distributed import gather_with_grad, local_offset


def _check_inputs(name: str, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None) -> None:
    if query.dim() != 2 or positive.shape != query.shape:
        raise ValueError(
            f"{name} expects query and positive of the same shape [batch, dim]; got query {tuple(query.shape)} and "
            f"positive {tuple(positive.shape)}"
        )
    if negatives is not None and (
        negatives.dim() != 3 or negatives.shape[0] != query.shape[0] or negatives.shape[2] != query.shape[1]
    ):
        raise ValueError(
            f"{name} expects negatives [batch, num_negatives, dim] matching query {tuple(query.shape)}; got negatives "
            f"{tuple(negatives.shape)}"
        )


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{name} needs a positive temperature, got {temperature}")


def global_candidates(
    positive: torch.Tensor, negatives: torch.Tensor | None, *, gather: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates every local query is scored against, and where this rank's positives sit among them.

    Args:
        positive: `[B, D]` this rank's positives.
        negatives: `[B, K, D]` this rank's mined negatives, or None.
        gather: gather candidates from all ranks (a no-op without a process group).

    Returns:
        `candidates` `[N + N*K, D]`, all positives of the global batch (in rank order) and then all their negatives
        flattened, and `positive_index` `[B]`, the row of each local query's own positive in `candidates`.
    """
    batch = positive.shape[0]
    all_positives = gather_with_grad(positive) if gather else positive  # [N, D]
    parts = [all_positives]
    if negatives is not None:
        all_negatives = gather_with_grad(negatives) if gather else negatives  # [N, K, D]
        parts.append(all_negatives.reshape(-1, all_negatives.shape[-1]))  # [N*K, D]
    candidates = torch.cat(parts, dim=0)  # [C, D]
    offset = local_offset(batch, positive.device) if gather else 0
    positive_index = torch.arange(offset, offset + batch, device=positive.device)  # [B]
    return candidates, positive_index


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.02,
    gather: bool = True,
) -> torch.Tensor:
    """InfoNCE with in-batch and mined negatives over the global batch.

    Each local query is scored against every positive of the global batch and every mined negative of the global
    batch (flattened); the target is its own positive. This is the loss of VLM2Vec and mmE5 (and sentence-
    transformers' `MultipleNegativesRankingLoss` with `gather_across_devices=True`); 0.02 is their temperature.

    Args:
        query: `[B, D]` L2-normalised query embeddings of this rank.
        positive: `[B, D]` L2-normalised positives, row i for query i.
        negatives: `[B, K, D]` L2-normalised mined negatives of each query, or None for in-batch negatives only.
        temperature: the softmax temperature the cosine similarities are divided by.
        gather: gather candidates from all ranks (then every rank must call the loss, as it holds collectives);
            False scores against this rank's candidates only.

    Returns:
        A scalar, the cross-entropy averaged over the local queries.

    References:
        Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding" (arXiv 1807.03748);
        Jiang et al. 2024, VLM2Vec (arXiv 2410.05160).

    Related:
        `unime_hard_negative_loss` keeps only the positive and the k hardest non-false negatives;
        `soft_label_kl` distils a teacher's scores over each query's own candidates.
    """
    _check_inputs("info_nce", query, positive, negatives)
    _check_temperature("info_nce", temperature)
    candidates, positive_index = global_candidates(positive, negatives, gather=gather)
    logits = query @ candidates.T / temperature  # [B, C]
    return F.cross_entropy(logits, positive_index)


def select_hard_negatives(
    scores: torch.Tensor, positive_index: torch.Tensor, *, margin: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each query's k hardest candidates that are not false negatives (UniME stage 2).

    A candidate scoring more than `margin` above the query's own positive is taken for an unlabelled positive (a
    false negative) and never chosen; the query's own positive is never chosen either. Of the rest the k highest
    scoring are kept.

    Args:
        scores: `[B, C]` similarities of each query to every candidate.
        positive_index: `[B]` the column of each query's own positive.
        margin: how far above the positive's score a candidate must be to count as a false negative.
        k: how many negatives to keep per query.

    Returns:
        `indices` `[B, k]` candidate columns, hardest first, and `valid` `[B, k]`, False where fewer than k
        candidates remained (those indices are padding and point at column 0).
    """
    if k < 1:
        raise ValueError(f"select_hard_negatives needs k >= 1, got {k}")
    if scores.dim() != 2 or positive_index.shape != scores.shape[:1]:
        raise ValueError(
            f"select_hard_negatives expects scores [batch, candidates] and positive_index [batch]; got "
            f"{tuple(scores.shape)} and {tuple(positive_index.shape)}"
        )
    batch, num_candidates = scores.shape
    # Selection is a discrete choice: no gradient flows through it, only through the scores it picks later.
    scores = scores.detach()
    rows = torch.arange(batch, device=scores.device)  # [B]
    positive_score = scores[rows, positive_index]  # [B]
    excluded = scores > (positive_score + margin).unsqueeze(1)  # [B, C]
    excluded[rows, positive_index] = True
    masked = scores.masked_fill(excluded, float("-inf"))  # [B, C]
    take = min(k, num_candidates)
    top_scores, indices = masked.topk(take, dim=1)  # [B, take]
    valid = torch.isfinite(top_scores)  # [B, take]
    indices = indices.masked_fill(~valid, 0)
    if take < k:
        # Fewer candidates than k in the whole batch: pad, so callers always see [B, k].
        pad = k - take
        indices = torch.cat([indices, indices.new_zeros(batch, pad)], dim=1)  # [B, k]
        valid = torch.cat([valid, valid.new_zeros(batch, pad)], dim=1)  # [B, k]
    return indices, valid


def unime_hard_negative_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.02,
    margin: float = 0.1,
    k: int = 8,
    gather: bool = True,
) -> torch.Tensor:
    """UniME stage-2 loss: cross-entropy over the positive and the k hardest candidates left after false-negative
    filtering.

    Candidates are the global batch's positives and mined negatives, as in `info_nce`. For local query i with
    s_pos = q_i . p_i, every other candidate scoring above s_pos + margin is dropped as a false negative; of the rest
    the k most similar are the hard negatives, and the loss is the cross-entropy of [s_pos, those k] / temperature
    with target 0. With fewer than k left, those left are used (the rest are masked out, never NaN).

    Args:
        query: `[B, D]` L2-normalised query embeddings of this rank.
        positive: `[B, D]` L2-normalised positives, row i for query i.
        negatives: `[B, K, D]` L2-normalised mined negatives, or None for in-batch negatives only (the UniME paper).
        temperature: the softmax temperature (UniME: 0.02).
        margin: the false-negative margin (UniME: 0.1).
        k: the number of hard negatives per query (UniME: 8).
        gather: gather candidates from all ranks (then every rank must call the loss, as it holds collectives);
            False uses this rank's candidates only.

    Returns:
        A scalar, the cross-entropy averaged over the local queries.

    References:
        Gu et al. 2025, "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs" (UniME,
        arXiv 2504.17432), `loss.py::SimpleContrastiveLossBatchRank` in deepglint/UniME. Unlike that code, nothing
        here is multiplied by the world size: `gather_with_grad` already returns the exact gradient.

    Related:
        `info_nce` uses every candidate; `select_hard_negatives` is the selection step on its own.
    """
    _check_inputs("unime_hard_negative_loss", query, positive, negatives)
    _check_temperature("unime_hard_negative_loss", temperature)
    candidates, positive_index = global_candidates(positive, negatives, gather=gather)
    scores = query @ candidates.T  # [B, C]
    return hard_negative_cross_entropy(scores, positive_index, temperature=temperature, margin=margin, k=k)


def hard_negative_cross_entropy(
    scores: torch.Tensor, positive_index: torch.Tensor, *, temperature: float, margin: float, k: int
) -> torch.Tensor:
    """UniME's stage-2 objective on a score matrix, whatever computed the scores (cosines, MaxSim).

    Args:
        scores: `[B, C]` similarities of each query to every candidate.
        positive_index: `[B]` the column of each query's own positive.
        temperature: the softmax temperature the kept scores are divided by.
        margin: the false-negative margin of `select_hard_negatives`.
        k: the number of hard negatives per query.

    Returns:
        A scalar, the cross-entropy of [s_pos, the k hardest non-false negatives] / temperature with target 0,
        averaged over the queries.
    """
    indices, valid = select_hard_negatives(scores, positive_index, margin=margin, k=k)  # [B, k], [B, k]
    rows = torch.arange(scores.shape[0], device=scores.device)  # [B]
    positive_score = scores[rows, positive_index].unsqueeze(1)  # [B, 1]
    negative_scores = scores.gather(1, indices).masked_fill(~valid, float("-inf"))  # [B, k]
    logits = torch.cat([positive_score, negative_scores], dim=1) / temperature  # [B, 1 + k]
    # The positive's logit is always finite, so the softmax never sees an all -inf row.
    target = torch.zeros_like(rows)  # [B]
    return F.cross_entropy(logits, target)
