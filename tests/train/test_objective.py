"""The objective maps a batch's named embeddings onto each loss exactly as the loss functions define it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unime.data.collator import TrainBatch
from unime.losses import info_nce, soft_label_kl, unime_hard_negative_loss
from unime.losses.matryoshka import matryoshka_loss
from unime.train.config import LossSettings
from unime.train.objective import EmbeddingObjective


def _embeddings(b: int = 4, k: int = 2, d: int = 8):
    torch.manual_seed(0)
    return {
        "query": F.normalize(torch.randn(b, d), dim=-1),
        "positive": F.normalize(torch.randn(b, d), dim=-1),
        "negatives": F.normalize(torch.randn(b * k, d), dim=-1),
    }


def test_objective_reshapes_negatives_example_major_and_passes_settings() -> None:
    e = _embeddings()
    batch = TrainBatch(chunks={}, size=4, num_negatives=2)
    negatives = e["negatives"].view(4, 2, 8)
    hard = EmbeddingObjective(LossSettings(name="unime_hard_negative", temperature=0.05, margin=0.2, hard_negatives=3))
    expected = unime_hard_negative_loss(e["query"], e["positive"], negatives, temperature=0.05, margin=0.2, k=3)
    torch.testing.assert_close(hard(e, batch), expected)
    plain = EmbeddingObjective(LossSettings(name="info_nce", temperature=0.1))
    torch.testing.assert_close(plain(e, batch), info_nce(e["query"], e["positive"], negatives, temperature=0.1))


def test_soft_labels_come_from_the_batch_scores_and_are_required() -> None:
    e = _embeddings()
    scores = torch.rand(4, 3)
    objective = EmbeddingObjective(LossSettings(name="soft_label_kl", temperature=0.05, teacher_temperature=0.1))
    got = objective(e, TrainBatch(chunks={}, size=4, num_negatives=2, scores=scores))
    expected = soft_label_kl(
        e["query"], e["positive"], e["negatives"].view(4, 2, 8), scores, temperature=0.05, teacher_temperature=0.1
    )
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="needs teacher/judge 'scores'"):
        objective(e, TrainBatch(chunks={}, size=4, num_negatives=2))


def test_matryoshka_dims_wrap_the_configured_loss() -> None:
    e = _embeddings()
    objective = EmbeddingObjective(LossSettings(name="info_nce", temperature=0.1, matryoshka_dims=[4, 8]))
    expected = matryoshka_loss(
        info_nce,
        [4, 8],
        query=e["query"],
        positive=e["positive"],
        negatives=e["negatives"].view(4, 2, 8),
        temperature=0.1,
    )
    torch.testing.assert_close(objective(e, TrainBatch(chunks={}, size=4, num_negatives=2)), expected)
