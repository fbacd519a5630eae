"""Tiny randomly initialised models, built offline in code: for tests, benchmarks and the embedded default."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

import torch

from unime.backbones import get_backbone
from unime.config import UnimeConfig
from unime.embedder import Embedder
from unime.reranker import Reranker

DEFAULT_BACKBONE = "qwen2_vl"


def build_tiny(
    backbone: str = DEFAULT_BACKBONE,
    *,
    seed: int = 0,
    config: UnimeConfig | None = None,
    kind: Literal["embedder", "reranker"] | None = None,
) -> Embedder | Reranker:
    """A tiny embedder or reranker of a registered backbone (a few hundred thousand parameters, CPU-fast)."""
    spec = get_backbone(backbone)
    if spec.build_tiny is None:
        raise ValueError(f"backbone {backbone!r} has no tiny builder")
    config = config or UnimeConfig(backbone=spec.name)
    if kind is not None:
        config = dataclasses.replace(config, kind=kind)
    model, processor = spec.build_tiny(seed)
    if config.kind == "reranker":
        add_answer_tokens(model, processor, (config.rerank.no_token, config.rerank.yes_token), seed)
        return Reranker(model, processor, config)
    return Embedder(model, processor, config)


def add_answer_tokens(model, processor, tokens: tuple[str, ...], seed: int) -> None:
    """Make the reranker's answer words single tokens of a tiny tokenizer (real ones have them already).

    The tiny BPE vocabulary splits "yes" and "no"; they are added as whole words (so "know" or "nothing" still
    tokenize as before) and the embedding and LM-head rows grow to match, seeded like the rest of the model.
    """
    from tokenizers import AddedToken

    tokenizer = processor.tokenizer
    missing = [token for token in tokens if len(tokenizer.encode(token, add_special_tokens=False)) != 1]
    if not missing:
        return
    tokenizer.add_tokens([AddedToken(token, single_word=True, normalized=False) for token in missing])
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the new rows are initialised like the model's: same seed, same rows
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def save_tiny(
    backbone: str, directory: str | os.PathLike, *, seed: int = 0, kind: Literal["embedder", "reranker"] = "embedder"
) -> Path:
    """Build a tiny model and write it as a unime model directory (`unime tiny <backbone> <dir>`)."""
    build_tiny(backbone, seed=seed, kind=kind).save(directory)
    return Path(directory)
