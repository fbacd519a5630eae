"""matryoshka_loss equals the weighted sum of the wrapped loss on truncated, renormalised inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unime.losses import info_nce, matryoshka_loss, soft_label_kl, unime_hard_negative_loss


def unit(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def cut(x: torch.Tensor, d: int) -> torch.Tensor:
    return F.normalize(x[..., :d], dim=-1)


@pytest.fixture
def embeddings():
    return unit(4, 16, seed=0), unit(4, 16, seed=1), unit(4, 2, 16, seed=2)


@pytest.mark.parametrize("loss_fn", [info_nce, unime_hard_negative_loss])
def test_equals_manual_weighted_sum(embeddings, loss_fn):
    query, positive, negatives = embeddings
    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]
    loss = matryoshka_loss(
        loss_fn, dims, weights=weights, query=query, positive=positive, negatives=negatives, temperature=0.1
    )
    expected = sum(
        w * loss_fn(cut(query, d), cut(positive, d), cut(negatives, d), temperature=0.1)
        for d, w in zip(dims, weights, strict=True)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_default_weights_no_negatives_and_full_dim(embeddings):
    query, positive, _ = embeddings
    loss = matryoshka_loss(info_nce, (16, 2), query=query, positive=positive)
    expected = info_nce(query, positive) + info_nce(cut(query, 2), cut(positive, 2))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # The full dimension alone is the wrapped loss (inputs are already unit vectors).
    alone = matryoshka_loss(info_nce, [16], query=query, positive=positive)
    assert alone.item() == pytest.approx(info_nce(query, positive).item(), rel=1e-12)


def test_passes_loss_kwargs_through(embeddings):
    query, positive, negatives = embeddings
    teacher = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss = matryoshka_loss(
        soft_label_kl, [8, 16], query=query, positive=positive, negatives=negatives, teacher_scores=teacher
    )
    expected = sum(soft_label_kl(cut(query, d), cut(positive, d), cut(negatives, d), teacher) for d in (8, 16))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_gradient_flows_through_every_slice(embeddings):
    query, positive, negatives = (x.clone().requires_grad_(True) for x in embeddings)
    matryoshka_loss(info_nce, [4, 16], query=query, positive=positive, negatives=negatives).backward()
    assert torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("dims", "weights", "message"),
    [
        ([0, 8], None, r"1\.\.16"),
        ([8, 17], None, r"1\.\.16.*\[8, 17\]"),
        ([-4], None, r"1\.\.16"),
        ([8.0], None, r"integers"),
        ([], None, "at least one"),
        ([8, 8], None, "repeat"),
        ([8, 16], [1.0], "one weight per dim"),
    ],
)
def test_rejects_bad_dims(embeddings, dims, weights, message):
    query, positive, negatives = embeddings
    with pytest.raises(ValueError, match=message):
        matryoshka_loss(info_nce, dims, weights=weights, query=query, positive=positive, negatives=negatives)
