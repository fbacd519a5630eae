"""Tiny randomly initialised models, built offline in code: for tests, benchmarks and the embedded default."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from unime.backbones import get_backbone, list_backbones
from unime.config import MultiVectorConfig, UnimeConfig
from unime.embedder import Embedder
from unime.errors import ConfigError
from unime.multi_vector import add_multi_vector_head
from unime.reranker import Reranker, add_answer_tokens

DEFAULT_BACKBONE = "qwen2_vl"


def build_tiny(
    backbone: str = DEFAULT_BACKBONE,
    *,
    seed: int = 0,
    config: UnimeConfig | None = None,
    kind: Literal["embedder", "reranker"] | None = None,
    size: Literal["tiny", "small"] = "tiny",
    multi_vector: MultiVectorConfig | None = None,
) -> Embedder | Reranker:
    """A tiny embedder or reranker of a registered backbone (a few hundred thousand parameters, CPU-fast).

    `size="small"` builds a wider, deeper one whose forward pass is compute-bound like a real model's (for
    benchmarks; backbones with a small builder only). `multi_vector` (or `config.multi_vector`) gives an embedder
    a multi-vector head, initialised from `seed`.
    """
    spec = get_backbone(backbone)
    builder = spec.build_tiny if size == "tiny" else spec.build_small
    if builder is None:
        sized = [name for name in list_backbones() if get_backbone(name).build_small is not None]
        raise ConfigError(f"backbone {backbone!r} has no {size} builder; backbones with one: {', '.join(sized)}")
    config = config or UnimeConfig(backbone=spec.name)
    if kind is not None:
        config = dataclasses.replace(config, kind=kind)
    multi_vector = multi_vector or config.multi_vector
    if multi_vector is not None and config.kind != "embedder":
        raise ConfigError(f"multi_vector: a {config.kind} has no multi-vector head; only an embedder can have one")
    # The config records the head once it is built (below); an Embedder refuses a recorded head it is not given.
    config = dataclasses.replace(config, multi_vector=None)
    model, processor = builder(seed)
    if config.kind == "reranker":
        add_answer_tokens(model, processor, (config.rerank.no_token, config.rerank.yes_token), seed)
        return Reranker(model, processor, config)
    embedder = Embedder(model, processor, config)
    return add_multi_vector_head(embedder, multi_vector, seed=seed) if multi_vector is not None else embedder


def save_tiny(
    backbone: str,
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    kind: Literal["embedder", "reranker"] = "embedder",
    size: Literal["tiny", "small"] = "tiny",
    multi_vector: MultiVectorConfig | None = None,
) -> Path:
    """Build a tiny (or small) model and write it as a unime model directory (`unime tiny <backbone> <dir>`)."""
    build_tiny(backbone, seed=seed, kind=kind, size=size, multi_vector=multi_vector).save(directory)
    return Path(directory)
