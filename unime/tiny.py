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
    max_pixels: int | None = None,
) -> Embedder | Reranker:
    """A tiny embedder or reranker of a registered backbone (a few hundred thousand parameters, CPU-fast).

    `size="small"` builds a wider, deeper one whose forward pass is compute-bound like a real model's (for
    benchmarks; backbones with a small builder only). `multi_vector` (or `config.multi_vector`) gives an embedder
    a multi-vector head, initialised from `seed`. `max_pixels` sets the image budget (`set_image_budget`;
    default: the builder's, 112 x 112 pixels = 16 image tokens for the Qwen2-VL families).
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
    if max_pixels is not None:
        set_image_budget(processor, max_pixels)
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
    max_pixels: int | None = None,
) -> Path:
    """Build a tiny (or small) model and write it as a unime model directory (`unime tiny <backbone> <dir>`); the
    image budget (`max_pixels`) is saved with its processor."""
    model = build_tiny(backbone, seed=seed, kind=kind, size=size, multi_vector=multi_vector, max_pixels=max_pixels)
    model.save(directory)
    return Path(directory)


def set_image_budget(processor, max_pixels: int) -> None:
    """Let `processor` resize each image to at most `max_pixels` pixels (its aspect ratio kept).

    The Qwen-VL families resize an image to a multiple of 28 x 28 pixels within the budget and give one
    language-model token per 28 x 28 pixels (14-pixel patches merged 2 x 2): 112 * 112 is 16 image tokens,
    224 * 224 is 64. The limit is the image processor's `size.longest_edge` (in pixels, as transformers' `max_pixels`
    sets it), so it is saved with the processor and every consumer of the directory (encode, eval, the server)
    resizes pages the same way. Only processors with such a pixel budget take it: another family's `longest_edge`
    is a side length in pixels, and silently reading a budget as a side would be wrong.
    """
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    factor = getattr(image_processor, "patch_size", 0) * getattr(image_processor, "merge_size", 0)
    if not factor or size is None or not size.get("longest_edge") or not size.get("shortest_edge"):
        raise ConfigError(
            f"max_pixels: the {type(image_processor).__name__} of this model has no pixel budget to set "
            "(only the Qwen-VL families' image processors have one)"
        )
    if max_pixels < max(factor * factor, size["shortest_edge"]):
        raise ConfigError(
            f"max_pixels {max_pixels}: at least {max(factor * factor, size['shortest_edge'])} pixels are needed "
            f"(one {factor} x {factor} image token, and the processor's minimum of {size['shortest_edge']})"
        )
    size["longest_edge"] = max_pixels
