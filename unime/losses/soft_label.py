"""Listwise distillation of a teacher's (judge's, reranker's) scores into the embedder's similarities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_label_kl(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    temperature: float = 0.02,
    teacher_temperature: float | None = None,
    symmetric: bool = True,
) -> torch.Tensor:
    """KL divergence between a teacher's and the student's distributions over each query's own candidates.

    The candidates of query i are its positive and its K negatives, in that order (no in-batch negatives, so
    nothing is gathered across ranks). The student distribution is softmax(q_i . [p_i, n_i1..n_iK] / temperature),
    the teacher's softmax(teacher_scores_i / teacher_temperature). The loss is KL(teacher || student), or with
    `symmetric` the mean of KL(teacher || student) and KL(student || teacher), as UniME-V2 trains its embedder.
    The teacher is a target: its scores are detached.

    Args:
        query: `[B, D]` L2-normalised query embeddings.
        positive: `[B, D]` L2-normalised positives.
        negatives: `[B, K, D]` L2-normalised negatives of each query.
        teacher_scores: `[B, 1 + K]` the teacher's scores for [positive, negatives...] (logits, e.g. a judge's
            p(yes) or a reranker's z_yes).
        temperature: the student's softmax temperature.
        teacher_temperature: the teacher's softmax temperature; None uses `temperature` (as UniME-V2 does).
        symmetric: average both KL directions instead of KL(teacher || student) alone.

    Returns:
        A scalar, the divergence averaged over the batch.

    References:
        Gu et al. 2025, UniME-V2 (arXiv 2510.13515), `DistributedSoftLabelSoftKLContrastiveLoss` in
        GaryGuTC/UniME-v2; Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    Related:
        `info_nce` and `unime_hard_negative_loss` train on hard labels over the global batch instead.
    """
    if query.dim() != 2 or positive.shape != query.shape:
        raise ValueError(
            f"soft_label_kl expects query and positive of the same shape [batch, dim]; got query "
            f"{tuple(query.shape)} and positive {tuple(positive.shape)}"
        )
    if negatives.dim() != 3 or negatives.shape[0] != query.shape[0] or negatives.shape[2] != query.shape[1]:
        raise ValueError(
            f"soft_label_kl expects negatives [batch, num_negatives, dim] matching query {tuple(query.shape)}; got "
            f"negatives {tuple(negatives.shape)}"
        )
    expected = (query.shape[0], 1 + negatives.shape[1])
    if tuple(teacher_scores.shape) != expected:
        raise ValueError(
            f"soft_label_kl expects teacher_scores [batch, 1 + num_negatives] = {expected} for negatives "
            f"{tuple(negatives.shape)}; got teacher_scores {tuple(teacher_scores.shape)}"
        )
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    if not (temperature > 0 and teacher_temperature > 0):
        raise ValueError(
            f"soft_label_kl needs positive temperatures, got temperature={temperature} and "
            f"teacher_temperature={teacher_temperature}"
        )
    candidates = torch.cat([positive.unsqueeze(1), negatives], dim=1)  # [B, 1 + K, D]
    student_logits = torch.einsum("bd,bkd->bk", query, candidates) / temperature  # [B, 1 + K]
    student = F.log_softmax(student_logits, dim=-1)  # [B, 1 + K]
    # Softmax in float32 at least: judge scores may come in half precision.
    teacher = F.log_softmax(teacher_scores.detach().to(student.dtype) / teacher_temperature, dim=-1)  # [B, 1 + K]
    # kl_div(input, target) is KL(target || input); both are log-probabilities here, which also avoids log(0).
    teacher_to_student = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    if not symmetric:
        return teacher_to_student
    student_to_teacher = F.kl_div(teacher, student, reduction="batchmean", log_target=True)
    return 0.5 * (teacher_to_student + student_to_teacher)
