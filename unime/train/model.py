"""The model a recipe starts from: a unime directory, a hub checkpoint, or a tiny offline model."""

from __future__ import annotations

from unime.train.config import ModelSettings

TINY_PREFIX = "tiny:"


def load_for_training(settings: ModelSettings):
    """`tiny:<backbone>` builds a tiny model in code (seeded); anything else goes through `unime.load`."""
    import unime

    if settings.name_or_path.startswith(TINY_PREFIX):
        return unime.build_tiny(settings.name_or_path[len(TINY_PREFIX) :], seed=settings.seed, kind=settings.kind)
    return unime.load(
        settings.name_or_path,
        backbone=settings.backbone,
        kind=settings.kind,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
    )
