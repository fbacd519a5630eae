"""The multi-vector (late-interaction) head: one small unit vector per token, scored by MaxSim.

ColPali / ColQwen style: a linear projection of the backbone's last hidden states to `dim` (128 by default),
L2-normalised per token. Which tokens count is `MultiVectorConfig.tokens`; padding never counts. Every matrix
travels with its mask: `[batch, seq, dim]` vectors and a `[batch, seq]` boolean mask of the tokens that count.

On disk the head is `multi_vector_head.safetensors` in the model directory, holding `custom_text_proj.weight`
`[dim, hidden]` and, with `MultiVectorConfig.bias`, `custom_text_proj.bias` `[dim]`: the names colpali-engine's
ColQwen classes and vLLM's ColQwen3 loader give the projection, so that the file can be read as they read theirs.
`projection_tensors` gives those tensors to every writer (this file, sentence-transformers' Dense, the ColQwen2
copy in the backbone's weights that `unime.saving` writes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from unime.config import MultiVectorConfig
from unime.errors import ModelLoadError
from unime.late_interaction import maxsim

if TYPE_CHECKING:  # the embedder imports this module: the type only, no circle at run time
    from unime.embedder import Embedder

HEAD_FILE = "multi_vector_head.safetensors"
WEIGHT_NAME = "custom_text_proj.weight"
BIAS_NAME = "custom_text_proj.bias"


class MultiVectorHead(nn.Module):
    """Projects hidden states `[..., hidden]` to unit token vectors `[..., dim]`."""

    def __init__(self, hidden_size: int, config: MultiVectorConfig):
        super().__init__()
        self.config = config
        # No bias by default: vLLM's ColQwen3 builds its projection without one when a config declares the dimension,
        # and a bias it does not build is dropped without a word; colpali-engine's ColQwen2 has one (`config.bias`).
        self.custom_text_proj = nn.Linear(hidden_size, config.dim, bias=config.bias)

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        projected = self.custom_text_proj(hidden.to(self.custom_text_proj.weight.dtype))  # [B, T, dim]
        return F.normalize(projected, p=2, dim=-1)  # [B, T, dim]


def build_head(hidden_size: int, config: MultiVectorConfig, *, seed: int = 0) -> MultiVectorHead:
    """A freshly initialised head (nn.Linear's default init), the same for the same seed."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return MultiVectorHead(hidden_size, config)
    finally:
        torch.random.set_rng_state(generator_state)  # the caller's random stream is left as it was


def token_mask(
    features: dict[str, torch.Tensor], config: MultiVectorConfig, image_token_id: int | None
) -> torch.Tensor:
    """The `[batch, seq]` boolean mask of the tokens that get a vector.

    Padding never counts. With `tokens="image"`, a row that holds image-patch tokens keeps only those; a row
    without any (a text-only input) keeps all its tokens, so that queries are unaffected. Decided per row, so a
    token's fate does not depend on what else is in the batch.
    """
    mask = features["attention_mask"].to(torch.bool)  # [B, T]
    if config.tokens == "all":
        return mask
    if image_token_id is None:
        raise ValueError("multi_vector.tokens='image' needs the backbone's image token id")
    is_image = features["input_ids"] == image_token_id  # [B, T]
    has_image = is_image.any(dim=1, keepdim=True)  # [B, 1]
    return mask & torch.where(has_image, is_image, torch.ones_like(is_image))  # [B, T]


def projection_tensors(head: MultiVectorHead, *, zero_bias: bool = False) -> dict[str, torch.Tensor]:
    """The projection as saved, float32 on the CPU: `custom_text_proj.weight` `[dim, hidden]`, and
    `custom_text_proj.bias` `[dim]` when the head has one - or zeros with `zero_bias`, for a reader that always
    builds a bias (a zero bias gives exactly the bias-free projection)."""
    projection = head.custom_text_proj
    tensors = {WEIGHT_NAME: projection.weight.detach().to("cpu", torch.float32).contiguous()}  # [dim, hidden]
    if projection.bias is not None:
        tensors[BIAS_NAME] = projection.bias.detach().to("cpu", torch.float32).contiguous()  # [dim]
    elif zero_bias:
        tensors[BIAS_NAME] = torch.zeros(projection.out_features)  # [dim]
    return tensors


def save_head(head: MultiVectorHead, directory: str | os.PathLike) -> Path:
    path = Path(directory) / HEAD_FILE
    save_file(projection_tensors(head), str(path), metadata={"format": "pt"})
    return path


def load_head(path: str | os.PathLike, config: MultiVectorConfig, hidden_size: int) -> MultiVectorHead:
    """Read a saved head, checking its weight against the config's `dim` and the backbone's hidden size."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"{path.parent}: its unime_config.json records a multi_vector head, but {HEAD_FILE} is missing"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path}: cannot read the multi-vector head ({err})") from err
    expected = {WEIGHT_NAME: (config.dim, hidden_size)}
    if config.bias:
        expected[BIAS_NAME] = (config.dim,)
    if set(tensors) != set(expected):
        raise ModelLoadError(
            f"{path}: expected the tensors {sorted(expected)} (unime_config.json's multi_vector.bias is "
            f"{str(config.bias).lower()}), found {sorted(tensors)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(
                f"{path}: {name} has shape {tuple(tensors[name].shape)}, but unime_config.json's multi_vector.dim is "
                f"{config.dim} and the backbone's hidden size is {hidden_size} (expected {shape})"
            )
    head = MultiVectorHead(hidden_size, config)
    with torch.no_grad():
        for name, parameter in head.named_parameters():
            parameter.copy_(tensors[name])
    return head


def pad_token_matrices(matrices: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token matrices `[n_i, dim]` stacked into `[n, max_i n_i, dim]` float32, zero-padded, with a `[n, max]` mask."""
    tensors = [torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m) for m in matrices]
    for index, tensor in enumerate(tensors):
        if tensor.dim() != 2 or tensor.shape[0] == 0:
            raise ValueError(
                f"token matrix {index}: expected a non-empty [n_tokens, dim] matrix, got {tuple(tensor.shape)}"
            )
        if tensor.shape[1] != tensors[0].shape[1]:
            raise ValueError(f"token matrix {index}: dim {tensor.shape[1]}, but matrix 0 has {tensors[0].shape[1]}")
    padded = nn.utils.rnn.pad_sequence([t.float() for t in tensors], batch_first=True)  # [n, L, dim]
    lengths = torch.tensor([t.shape[0] for t in tensors])  # [n]
    mask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)  # [n, L]
    return padded, mask


def maxsim_scores(
    queries: Sequence[np.ndarray | torch.Tensor],
    documents: Sequence[np.ndarray | torch.Tensor],
    *,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Late-interaction scores `[n_queries, n_documents]` of lists of `[n_tokens_i, dim]` token matrices (the
    form `Embedder.encode(..., output="multi_vector")` gives): padded with masks, then `late_interaction.maxsim`
    (`compute_dtype=torch.bfloat16` scores in bf16, faster where the matmul has bf16 units)."""
    if not queries or not documents:
        raise ValueError(f"maxsim needs at least one query and one document, got {len(queries)} and {len(documents)}")
    query_tokens, query_mask = pad_token_matrices(queries)  # [n, Lq, d], [n, Lq]
    document_tokens, document_mask = pad_token_matrices(documents)  # [m, Ld, d], [m, Ld]
    return maxsim(query_tokens, query_mask, document_tokens, document_mask, compute_dtype=compute_dtype)  # [n, m]


def add_multi_vector_head(embedder: Embedder, config: MultiVectorConfig | None = None, *, seed: int = 0) -> Embedder:
    """Give an embedder a freshly initialised multi-vector head (seeded), to train; returns the embedder."""
    embedder.set_multi_vector_head(build_head(embedder.hidden_size, config or MultiVectorConfig(), seed=seed))
    return embedder
