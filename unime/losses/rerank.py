"""Reranker losses on yes/no answer logits: SFT, contrastive (CL), and the unified form that separates them.

From "SFT or Contrastive Learning? Towards Better Multimodal LLM Reranking" (Dai et al., 2025). Every loss
takes `logits [B, G, 2]`: for each of B queries, G = 1 + N candidate documents, the positive first, each
with its answer logits (z_no, z_yes) at the last prompt position.

The paper writes the gradient of either loss with respect to a pair's last hidden state h as a weight times
a direction, dL/dh = W * D:
- SFT (per-pair cross-entropy on yes/no): W+ = 1 - p(yes|h+) and W- = p(yes|h-), D = M_yes - M_no;
- CL (InfoNCE over the G documents on z_yes): W+ = 1 - q+ and W- = q- with q = softmax(z_yes) over the
  group, D = M_yes;
(M_* are rows of the LM head; the positive's direction is descended, the negatives' ascended.) Its
`unified_rerank_loss` lets W and D be chosen independently, to tell which of the two makes SFT better.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

RerankWeight = Literal["sft", "cl", "one"]
RerankDirection = Literal["sft", "cl"]


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[-1] != 2 or logits.shape[1] < 1:
        raise ValueError(f"rerank losses expect logits [queries, 1 + negatives, 2], got {tuple(logits.shape)}")


def rerank_sft_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-pair cross-entropy: the positive should answer "yes", every negative "no".

    Each pair is its own binary classification, p(yes) = softmax([z_no, z_yes])[yes]; the loss sums a query's
    G pair losses and averages over queries (the scale at which the paper compares W and D).

    Args:
        logits: `[B, G, 2]` answer logits (z_no, z_yes), the positive at index 0.

    Returns:
        A scalar.

    Related: `rerank_contrastive_loss` (listwise), `unified_rerank_loss` (both, decomposed).
    """
    _check_logits(logits)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # [B, G, 2]
    labels = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)  # [B, G] 0 = "no"
    labels[:, 0] = 1  # the positive answers "yes"
    return -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(1).mean()


def rerank_contrastive_loss(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Listwise InfoNCE over a query's 1 positive + N negatives, on the raw "yes" logit.

    Args:
        logits: `[B, G, 2]` answer logits (z_no, z_yes), the positive at index 0.
        temperature: divides z_yes (the paper uses the raw logit: 1.0).

    Returns:
        A scalar: mean over queries of -log softmax(z_yes / T)[positive].
    """
    _check_logits(logits)
    z_yes = logits[..., 1].float() / temperature  # [B, G]
    return -F.log_softmax(z_yes, dim=1)[:, 0].mean()


def rerank_gradient_weights(logits: torch.Tensor, weight: RerankWeight, temperature: float = 1.0) -> torch.Tensor:
    """The paper's W: how strongly each pair's direction is followed, `[B, G]`, without gradient."""
    _check_logits(logits)
    with torch.no_grad():
        logits = logits.float()
        if weight == "one":
            return torch.ones(logits.shape[:2], device=logits.device)
        if weight == "sft":
            p_yes = torch.softmax(logits, dim=-1)[..., 1]  # [B, G] each pair on its own
        elif weight == "cl":
            p_yes = torch.softmax(logits[..., 1] / temperature, dim=1)  # [B, G] over the group
        else:
            raise ValueError(f"weight must be 'sft', 'cl' or 'one', got {weight!r}")
        weights = p_yes.clone()
        weights[:, 0] = 1.0 - p_yes[:, 0]  # the positive is pushed as hard as it is still unsure
        return weights


def unified_rerank_loss(
    logits: torch.Tensor,
    weight: RerankWeight = "sft",
    direction: RerankDirection = "sft",
    temperature: float = 1.0,
) -> torch.Tensor:
    """The paper's unified reranking loss: gradient W * D with W and D chosen independently.

    The value is a surrogate whose gradient is the point: sum over a query's pairs of sign * W * s(h), with W
    detached and s the score whose gradient is the direction D (z_yes - z_no for D_SFT, z_yes / T for D_CL);
    the sign descends the positive and ascends the negatives. `weight="sft", direction="sft"` has exactly the
    gradient of `rerank_sft_loss`, `weight="cl", direction="cl"` that of `rerank_contrastive_loss`;
    `weight="one"` is the paper's W = 1 probe.

    Args:
        logits: `[B, G, 2]` answer logits (z_no, z_yes), the positive at index 0.
        weight: `sft`, `cl` or `one`.
        direction: `sft` (M_yes - M_no) or `cl` (M_yes).
        temperature: of the CL weight and direction.
    """
    weights = rerank_gradient_weights(logits, weight, temperature)  # [B, G]
    z_no, z_yes = logits.float().unbind(-1)  # [B, G] each
    if direction == "sft":
        scores = z_yes - z_no
    elif direction == "cl":
        scores = z_yes / temperature
    else:
        raise ValueError(f"direction must be 'sft' or 'cl', got {direction!r}")
    sign = torch.ones_like(scores)
    sign[:, 0] = -1.0  # raise the positive's score, lower the negatives'
    return (sign * weights * scores).sum(1).mean()
