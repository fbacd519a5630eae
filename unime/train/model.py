"""The model a recipe starts from: a unime directory, a hub checkpoint, or a tiny offline model."""

from __future__ import annotations

from unime.errors import ConfigError
from unime.multi_task import build_tiny_multi_task
from unime.multi_vector import add_multi_vector_head
from unime.tiny import set_image_budget
from unime.train.config import ModelSettings

TINY_PREFIX = "tiny:"


def load_for_training(settings: ModelSettings):
    """`tiny:<backbone>` builds a tiny model in code (seeded); anything else goes through `unime.load`."""
    import unime

    if settings.name_or_path.startswith(TINY_PREFIX) and settings.kind == "multi_task":
        model = build_tiny_multi_task(settings.name_or_path[len(TINY_PREFIX) :], seed=settings.seed)
    elif settings.name_or_path.startswith(TINY_PREFIX):
        model = unime.build_tiny(settings.name_or_path[len(TINY_PREFIX) :], seed=settings.seed, kind=settings.kind)
    else:
        model = unime.load(
            settings.name_or_path,
            backbone=settings.backbone,
            kind=settings.kind,
            dtype=settings.dtype,
            attn_implementation=settings.attn_implementation,
        )
    prompt_changes = {
        name: value
        for name, value in (
            ("system_prompt", settings.rerank_system_prompt),
            ("default_instruction", settings.rerank_instruction),
        )
        if value is not None
    }
    if prompt_changes:
        if settings.kind == "embedder":
            raise ConfigError(
                "model.rerank_system_prompt / model.rerank_instruction apply to rerankers (and multi_task models) only"
            )
        model.set_rerank_prompt(**prompt_changes)
    if settings.max_pixels is not None:
        # A multi-task model's embedder and reranker views each hold a processor: both see the same budget.
        views = [model.embedder, model.reranker] if settings.kind == "multi_task" else [model]
        for view in views:
            set_image_budget(view.processor, settings.max_pixels)
    if settings.multi_vector.enabled:
        attach_multi_vector_head(model, settings)
    return model


def attach_multi_vector_head(model, settings: ModelSettings) -> None:
    """A new seeded head for a start model without one; a start model's own head is kept if it matches."""
    if settings.kind == "reranker":
        raise ConfigError("model.multi_vector applies to embedders and multi_task models only (not to a reranker)")
    wanted = settings.multi_vector.head()
    if model.multi_vector_head is None:
        add_multi_vector_head(model, wanted, seed=settings.seed)
    elif model.config.multi_vector != wanted:
        raise ConfigError(
            f"model.multi_vector {wanted} differs from the head {settings.name_or_path} already has "
            f"({model.config.multi_vector}); set model.multi_vector to match it, or enabled: false to keep it"
        )
