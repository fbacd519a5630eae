"""Reranker losses against naive loops, and the unified form reducing to SFT and CL (same gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from unime.losses.rerank import (
    rerank_contrastive_loss,
    rerank_gradient_weights,
    rerank_sft_loss,
    unified_rerank_loss,
)


def _logits(seed: int = 0, queries: int = 3, group: int = 5) -> torch.Tensor:
    return torch.randn(queries, group, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def _naive_sft(logits: torch.Tensor) -> float:
    total = 0.0
    for query in logits.tolist():
        for position, (z_no, z_yes) in enumerate(query):
            p_yes = math.exp(z_yes) / (math.exp(z_yes) + math.exp(z_no))
            total += -math.log(p_yes if position == 0 else 1 - p_yes)
    return total / len(logits)


def _naive_cl(logits: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for query in logits.tolist():
        exps = [math.exp(z_yes / temperature) for _, z_yes in query]
        total += -math.log(exps[0] / sum(exps))
    return total / len(logits)


def test_sft_loss_is_per_pair_cross_entropy_on_yes_for_the_positive_and_no_for_negatives():
    logits = _logits()
    assert float(rerank_sft_loss(logits)) == pytest.approx(_naive_sft(logits), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_contrastive_loss_is_infonce_over_the_yes_logits(temperature):
    logits = _logits(1)
    assert float(rerank_contrastive_loss(logits, temperature)) == pytest.approx(
        _naive_cl(logits, temperature), rel=1e-6
    )


def _gradient(loss_fn, logits: torch.Tensor) -> torch.Tensor:
    leaf = logits.clone().requires_grad_(True)
    loss_fn(leaf).backward()
    return leaf.grad


def test_unified_form_with_sft_weight_and_direction_has_the_sft_gradient():
    logits = _logits(2)
    expected = _gradient(rerank_sft_loss, logits)
    got = _gradient(lambda x: unified_rerank_loss(x, weight="sft", direction="sft"), logits)
    assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_unified_form_with_cl_weight_and_direction_has_the_cl_gradient(temperature):
    logits = _logits(3)
    expected = _gradient(lambda x: rerank_contrastive_loss(x, temperature), logits)
    got = _gradient(lambda x: unified_rerank_loss(x, weight="cl", direction="cl", temperature=temperature), logits)
    assert torch.allclose(got, expected, atol=1e-10)


def test_weights_are_the_papers_hand_computed_values():
    # One query: positive (z_no, z_yes) = (0, ln 3) -> p(yes) = 3/4; negative (0, 0) -> p(yes) = 1/2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64)
    assert rerank_gradient_weights(logits, "sft")[0].tolist() == pytest.approx([0.25, 0.5])
    # CL: softmax over the yes logits (ln 3, 0) = (3/4, 1/4): W+ = 1 - 3/4, W- = 1/4.
    assert rerank_gradient_weights(logits, "cl")[0].tolist() == pytest.approx([0.25, 0.25])
    assert rerank_gradient_weights(logits, "one").tolist() == [[1.0, 1.0]]


def test_swapping_the_direction_changes_only_which_logits_move():
    logits = _logits(4)
    cl_direction = _gradient(lambda x: unified_rerank_loss(x, weight="sft", direction="cl"), logits)
    assert torch.all(cl_direction[..., 0] == 0)  # D_CL = M_yes: z_no gets no gradient
    sft_direction = _gradient(lambda x: unified_rerank_loss(x, weight="sft", direction="sft"), logits)
    assert torch.allclose(sft_direction[..., 0], -sft_direction[..., 1])  # D_SFT = M_yes - M_no
    assert torch.allclose(cl_direction[..., 1], sft_direction[..., 1])  # same weights on z_yes
    # The positive's yes logit is pushed up, each negative's down.
    assert torch.all(sft_direction[:, 0, 1] < 0) and torch.all(sft_direction[:, 1:, 1] > 0)


def test_bad_shapes_and_choices_are_refused():
    with pytest.raises(ValueError, match=r"logits \[queries, 1 \+ negatives, 2\]"):
        rerank_sft_loss(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="weight must be"):
        unified_rerank_loss(_logits(), weight="both")
    with pytest.raises(ValueError, match="direction must be"):
        unified_rerank_loss(_logits(), direction="up")
