"""Tiny randomly initialised models, built offline in code: for tests, benchmarks and the embedded default."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from unime.backbones import get_backbone
from unime.config import UnimeConfig
from unime.embedder import Embedder
from unime.reranker import Reranker, add_answer_tokens

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


def save_tiny(
    backbone: str, directory: str | os.PathLike, *, seed: int = 0, kind: Literal["embedder", "reranker"] = "embedder"
) -> Path:
    """Build a tiny model and write it as a unime model directory (`unime tiny <backbone> <dir>`)."""
    build_tiny(backbone, seed=seed, kind=kind).save(directory)
    return Path(directory)
