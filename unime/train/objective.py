"""The embedding objective: group embeddings of a batch -> the configured loss (a pure tensor function)."""

from __future__ import annotations

from typing import Any

import torch

from unime.data.collator import TrainBatch
from unime.errors import ConfigError
from unime.losses import get_loss
from unime.losses.matryoshka import matryoshka_loss
from unime.train.config import LossSettings


class EmbeddingObjective:
    """Maps a batch's named embeddings onto the loss's arguments; the loss itself holds no model."""

    def __init__(self, settings: LossSettings):
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
