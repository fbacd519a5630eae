"""The embedding objective: group embeddings of a batch -> the configured loss (a pure tensor function)."""

from __future__ import annotations

from typing import Any

import torch

from unime.data.collator import TrainBatch
from unime.losses import get_loss
from unime.losses.matryoshka import matryoshka_loss
from unime.train.config import LossSettings


class EmbeddingObjective:
    """Maps a batch's named embeddings onto the loss's arguments; the loss itself holds no model."""

    def __init__(self, settings: LossSettings):
        self.settings = settings
        self.loss_fn = get_loss(settings.name)

    def loss_kwargs(self, batch: TrainBatch) -> dict[str, Any]:
        s = self.settings
        if s.name == "unime_hard_negative":
            return {"temperature": s.temperature, "margin": s.margin, "k": s.hard_negatives}
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
        if "teacher_scores" in kwargs:
            kwargs["teacher_scores"] = kwargs["teacher_scores"].to(query.device)
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
