"""Training objectives: a batch's named model outputs -> the configured loss (a pure tensor function).

`EmbeddingObjective` reads group embeddings (query, positive, negatives), or with `late_interaction` each group's
token matrices and masks; `RerankObjective` reads the answer logits of every (query, document) pair.
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
        if settings.name in ("text_distill_kl", "late_interaction") and settings.matryoshka_dims:
            raise ConfigError(f"loss.matryoshka_dims is not supported with {settings.name}")
        if settings.name == "late_interaction" and settings.hard_negatives < 0:
            raise ConfigError(f"loss.hard_negatives: expected >= 0 (0: every candidate), got {settings.hard_negatives}")
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

    def __call__(self, embeddings: dict[str, Any], batch: TrainBatch) -> torch.Tensor:
        if self.settings.name == "late_interaction":
            return self.late_interaction(embeddings, batch)
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

    def late_interaction(
        self, matrices: dict[str, tuple[torch.Tensor, torch.Tensor]], batch: TrainBatch
    ) -> torch.Tensor:
        """MaxSim contrastive loss on each group's `([n, T, d], [n, T])` token matrices and masks."""
        (query, query_mask), (positive, positive_mask) = matrices["query"], matrices["positive"]
        negatives = negatives_mask = None
        if batch.num_negatives:
            tokens, mask = matrices["negatives"]  # [B*K, Tn, d], [B*K, Tn], query-major
            negatives = tokens.view(batch.size, batch.num_negatives, *tokens.shape[1:])  # [B, K, Tn, d]
            negatives_mask = mask.view(batch.size, batch.num_negatives, -1)  # [B, K, Tn]
        s = self.settings
        return self.loss_fn(
            query.float(),
            query_mask,
            positive.float(),
            positive_mask,
            None if negatives is None else negatives.float(),
            negatives_mask,
            temperature=s.temperature,
            margin=s.margin,
            k=s.hard_negatives or None,
        )


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
