"""Textual discriminative knowledge distillation (UniME stage 1): match a text-embedding teacher's similarities.

The student (the MLLM's language model, fed text only) and the teacher (an LLM text embedder whose embeddings are
cached on disk by `unime.train.teacher.TeacherCache`) each score every local query against all positives of the
global batch. The student is trained to give the same distribution over those candidates as the teacher, so it
learns the teacher's notion of which texts are close without having to share its dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unime.distributed import gather_with_grad


def _check_pair(query: torch.Tensor, positive: torch.Tensor, query_name: str, positive_name: str) -> None:
    if query.dim() != 2 or positive.shape != query.shape:
        raise ValueError(
            f"similarity_kl expects {query_name} and {positive_name} of the same shape [batch, dim]; got {query_name} "
            f"{tuple(query.shape)} and {positive_name} {tuple(positive.shape)}"
        )


def similarity_kl(
    query: torch.Tensor,
    positive: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_positive: torch.Tensor,
    *,
    temperature: float = 0.02,
    teacher_temperature: float | None = None,
    gather: bool = True,
) -> torch.Tensor:
    """KL(teacher || student) between the two models' distributions over the in-batch candidates of each query.

    For local query i the candidates are all positives of the global batch (gathered from every rank, in rank
    order). The student distribution is softmax(q_i . P_s / temperature) over the student's gathered positives
    P_s, the teacher's softmax(tq_i . P_t / teacher_temperature) over the teacher's gathered positives P_t. The
    loss is zero when the two temperature-scaled similarity matrices are equal (strictly: when every row of one is
    the other's row plus a constant, which a softmax ignores) and positive otherwise. The teacher is a target: its
    tensors are detached, and the logits are taken in at least float32 precision.

    The student's positives are gathered with gradient (`gather_with_grad`), so the loss averaged across ranks by
    DDP has the gradients of one process on the concatenated batch.

    Args:
        query: `[B, D]` L2-normalised student embeddings of this rank's queries.
        positive: `[B, D]` L2-normalised student embeddings of their positives, row i for query i.
        teacher_query: `[B, Dt]` L2-normalised teacher embeddings of the same queries (Dt may differ from D).
        teacher_positive: `[B, Dt]` L2-normalised teacher embeddings of the same positives.
        temperature: the student's softmax temperature.
        teacher_temperature: the teacher's softmax temperature; None uses `temperature`.
        gather: gather candidates from all ranks (then every rank must call the loss, as it holds collectives);
            False scores against this rank's positives only. Without a process group both are the same.

    Returns:
        A scalar, KL(teacher || student) averaged over the local queries.

    References:
        Gu et al. 2025, "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs" (UniME,
        arXiv 2504.17432); Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    Related:
        `soft_label_kl` distils a teacher's scores over each query's own positive and negatives instead of the
        in-batch candidates; `info_nce` trains on hard labels over the same candidates.
    """
    _check_pair(query, positive, "query", "positive")
    _check_pair(teacher_query, teacher_positive, "teacher_query", "teacher_positive")
    if teacher_query.shape[0] != query.shape[0]:
        raise ValueError(
            f"similarity_kl expects the teacher's batch to match the student's; got query {tuple(query.shape)} and "
            f"teacher_query {tuple(teacher_query.shape)}"
        )
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    if not (temperature > 0 and teacher_temperature > 0):
        raise ValueError(
            f"similarity_kl needs positive temperatures, got temperature={temperature} and "
            f"teacher_temperature={teacher_temperature}"
        )
    # The softmax over a large global batch at temperature 0.02 is sharp: take it in float32 at least, so a
    # bfloat16 student still gets a faithful KL (its gradient flows back in its own dtype).
    dtype = torch.promote_types(query.dtype, torch.float32)
    teacher_query = teacher_query.detach().to(device=query.device, dtype=dtype)
    teacher_positive = teacher_positive.detach().to(device=query.device, dtype=dtype)

    # Both sides must see the same candidates in the same order: gather the teacher's positives too (it has no
    # gradient, so the gather's backward never runs for it).
    student_candidates = gather_with_grad(positive) if gather else positive  # [N, D]
    teacher_candidates = gather_with_grad(teacher_positive) if gather else teacher_positive  # [N, Dt]

    student_logits = query.to(dtype) @ student_candidates.to(dtype).T / temperature  # [B, N]
    teacher_logits = teacher_query @ teacher_candidates.T / teacher_temperature  # [B, N]
    student = F.log_softmax(student_logits, dim=-1)  # [B, N]
    teacher = F.log_softmax(teacher_logits, dim=-1)  # [B, N]
    # kl_div(input, target) is KL(target || input); log-probabilities on both sides avoid log(0) for a sharp teacher.
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)
