"""Training objectives: a batch's named model outputs -> the configured loss (a pure tensor function).

`EmbeddingObjective` reads group embeddings (query, positive, negatives); `RerankObjective` reads the answer
logits of every (query, document) pair.
"""

from __future__ import annotations

from typing import Any

import torch

from unime.data.collator import TrainBatch
from unime.errors import ConfigError
from unime.losses import RERANK_LOSSES, get_loss
from unime.losses.matryoshka import matryoshka_loss
from unime.train.config import LossSettings


class EmbeddingObjective:
    """Maps a batch's named embeddings onto the loss's arguments; the loss itself holds no model."""

    def __init__(self, settings: LossSettings):
        if settings.name in RERANK_LOSSES:
            raise ConfigError(f"loss.name {settings.name!r} trains a reranker: set model.kind: reranker")
        if settings.name == "text_distill_kl" and settings.matryoshka_dims:
            raise ConfigError("loss.matryoshka_dims is not supported with text_distill_kl (stage 1)")
        self.settings = settings
        self.loss_fn = get_loss(settings.name)

    def loss_kwargs(self, batch: TrainBatch) -> dict[str, Any]:
        s = self.settings
        if s.name == "unime_hard_negative":
            return {"temperature": s.temperature, "margin": s.margin, "k": s.hard_negatives}
        if s.name == "text_distill_kl":
            if batch.teacher is None:
                raise ValueError("loss text_distill_kl needs teacher embeddings (the `distill` section)")
            return {
                "teacher_query": batch.teacher["query"],
                "teacher_positive": batch.teacher["positive"],
                "temperature": s.temperature,
                "teacher_temperature": s.teacher_temperature,
            }
        if s.name == "soft_label_kl":
            if batch.scores is None:
                raise ValueError("loss soft_label_kl needs teacher/judge 'scores' on every training row")
            return {
                "teacher_scores": batch.scores,
                "temperature": s.temperature,
                "teacher_temperature": s.teacher_temperature,
            }
        return {"temperature": s.temperature}

    def __call__(self, embeddings: dict[str, torch.Tensor], batch: TrainBatch) -> torch.Tensor:
        query, positive = embeddings["query"], embeddings["positive"]  # [B, D] each
        negatives = None
        if batch.num_negatives:
            negatives = embeddings["negatives"].view(batch.size, batch.num_negatives, -1)  # [B, K, D]
        kwargs = self.loss_kwargs(batch)
        for key in ("teacher_scores", "teacher_query", "teacher_positive"):
            if key in kwargs:
                kwargs[key] = kwargs[key].to(query.device)
        if self.settings.name == "text_distill_kl":
            # Stage 1 compares in-batch similarity distributions of queries over positives: no mined negatives.
            return self.loss_fn(query, positive, **kwargs)
        if self.settings.matryoshka_dims:
            return matryoshka_loss(
                self.loss_fn,
                self.settings.matryoshka_dims,
                query=query,
                positive=positive,
                negatives=negatives,
                **kwargs,
            )
        return self.loss_fn(query, positive, negatives, **kwargs)


class RerankObjective:
    """Maps the answer logits of a batch's pairs onto a reranker loss; the loss itself holds no model."""

    def __init__(self, settings: LossSettings):
        if settings.name not in RERANK_LOSSES:
            raise ConfigError(
                f"loss.name {settings.name!r} trains an embedder, but model.kind is reranker; use one of "
                f"{sorted(RERANK_LOSSES)}"
            )
        if settings.matryoshka_dims:
            raise ConfigError("loss.matryoshka_dims applies to embedders only")
        self.settings = settings
        self.loss_fn = get_loss(settings.name)

    def __call__(self, outputs: dict[str, torch.Tensor], batch: TrainBatch) -> torch.Tensor:
        logits = outputs["pairs"].view(batch.size, batch.num_negatives + 1, 2)  # [B, G, 2], positive first
        s = self.settings
        if s.name == "rerank_sft":
            return self.loss_fn(logits)
        if s.name == "rerank_contrastive":
            return self.loss_fn(logits, temperature=s.temperature)
        return self.loss_fn(logits, weight=s.rerank_weight, direction=s.rerank_direction, temperature=s.temperature)
