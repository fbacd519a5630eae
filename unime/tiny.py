"""Tiny randomly initialised models, built offline in code: for tests, benchmarks and the embedded default."""

from __future__ import annotations

import os
from pathlib import Path

from unime.backbones import get_backbone
from unime.config import UnimeConfig
from unime.embedder import Embedder

DEFAULT_BACKBONE = "qwen2_vl"


def build_tiny(backbone: str = DEFAULT_BACKBONE, *, seed: int = 0, config: UnimeConfig | None = None) -> Embedder:
    """A tiny embedder of the given registered backbone (a few hundred thousand parameters, CPU-fast)."""
    spec = get_backbone(backbone)
    if spec.build_tiny is None:
        raise ValueError(f"backbone {backbone!r} has no tiny builder")
    model, processor = spec.build_tiny(seed)
    return Embedder(model, processor, config or UnimeConfig(backbone=spec.name))


def save_tiny(backbone: str, directory: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build a tiny model and write it as a unime model directory (`unime tiny <backbone> <dir>`)."""
    embedder = build_tiny(backbone, seed=seed)
    embedder.save(directory)
    return Path(directory)
