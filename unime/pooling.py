"""The one pooling function: turn per-token hidden states into one vector per sequence.

Every consumer (the embedder, the training objectives, the sentence-transformers module and the evaluation
harness) pools through `pool`, so that the same model directory gives the same vectors everywhere.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PoolingMode = Literal["last", "mean", "cls"]
POOLING_MODES: tuple[str, ...] = ("last", "mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: PoolingMode = "last") -> torch.Tensor:
    """Pool token states into sequence vectors, correct under left and right padding.

    Args:
        hidden: `[batch, seq, dim]` hidden states of the last layer.
        attention_mask: `[batch, seq]`, 1 for real tokens and 0 for padding, on either side.
        mode: `last` takes the last real token (what a causal LM has read the whole input at; UniME,
            VLM2Vec and E5-V use it), `cls` the first real token, `mean` the average of real tokens.

    Returns:
        `[batch, dim]` pooled vectors, in `hidden`'s dtype.
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"pool expects hidden [batch, seq, dim] and attention_mask [batch, seq]; got {tuple(hidden.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.bool)  # [B, T]
    if not bool(mask.any(dim=1).all()):
        raise ValueError("pool got a sequence with no real token (an all-zero attention_mask row)")
    batch_index = torch.arange(hidden.shape[0], device=hidden.device)  # [B]
    if mode == "last":
        # Position of the last 1 in each row, whichever side the padding is on.
        seq_len = mask.shape[1]
        last = seq_len - 1 - mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)  # [B]
        return hidden[batch_index, last]  # [B, D]
    if mode == "cls":
        first = mask.to(torch.int64).argmax(dim=1)  # [B]
        return hidden[batch_index, first]  # [B, D]
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
        summed = (hidden * weights).sum(dim=1)  # [B, D]
        return summed / weights.sum(dim=1)  # [B, D]
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


def finish_embeddings(pooled: torch.Tensor, *, normalize: bool, truncate_dim: int | None = None) -> torch.Tensor:
    """Matryoshka truncation, then optional L2 normalisation (the order sentence-transformers uses).

    Args:
        pooled: `[batch, dim]` pooled vectors.
        normalize: scale each vector to unit L2 norm.
        truncate_dim: keep the first `truncate_dim` dimensions (matryoshka); None keeps all.
    """
    if truncate_dim is not None:
        if not 0 < truncate_dim <= pooled.shape[-1]:
            raise ValueError(f"truncate_dim must be in 1..{pooled.shape[-1]}, got {truncate_dim}")
        pooled = pooled[..., :truncate_dim]  # [B, d]
    if normalize:
        pooled = F.normalize(pooled, p=2, dim=-1)
    return pooled
