"""InfoNCE and the UniME hard-negative loss against naive per-query loops and hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unime.losses import (
    LOSSES,
    get_loss,
    info_nce,
    late_interaction_loss,
    select_hard_negatives,
    soft_label_kl,
    unime_hard_negative_loss,
)
from unime.losses.distill import similarity_kl
from unime.losses.rerank import rerank_contrastive_loss, rerank_sft_loss, unified_rerank_loss


def unit(*shape: int, seed: int) -> torch.Tensor:
    """Random L2-normalised vectors in float64, so comparisons can be tight and softmaxes do not round to 1."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def batch(b: int = 4, k: int = 2, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, positives near their queries (so the margin rule matters), and unrelated negatives."""
    query = unit(b, d, seed=seed)
    positive = F.normalize(query + 0.6 * unit(b, d, seed=seed + 1), dim=-1)
    negatives = unit(b, k, d, seed=seed + 2)
    return query, positive, negatives


def naive_candidates(positive: torch.Tensor, negatives: torch.Tensor | None) -> list[torch.Tensor]:
    """All positives, then every query's negatives in order: the candidate list the losses document."""
    candidates = [positive[j] for j in range(positive.shape[0])]
    if negatives is not None:
        candidates += [negatives[j, m] for j in range(negatives.shape[0]) for m in range(negatives.shape[1])]
    return candidates


def naive_info_nce(query, positive, negatives, temperature) -> float:
    candidates = naive_candidates(positive, negatives)
    total = 0.0
    for i in range(query.shape[0]):
        logits = [float(query[i] @ c) / temperature for c in candidates]
        total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    return total / query.shape[0]


def naive_unime(query, positive, negatives, temperature, margin, k) -> float:
    candidates = naive_candidates(positive, negatives)
    total = 0.0
    for i in range(query.shape[0]):
        scores = [float(query[i] @ c) for c in candidates]
        s_pos = scores[i]
        kept = sorted((s for j, s in enumerate(scores) if j != i and s <= s_pos + margin), reverse=True)[:k]
        logits = [s / temperature for s in [s_pos, *kept]]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return total / query.shape[0]


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("temperature", [0.02, 0.5])
def test_info_nce_matches_naive_loop(with_negatives, temperature):
    query, positive, negatives = batch()
    negatives = negatives if with_negatives else None
    loss = info_nce(query, positive, negatives, temperature=temperature)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(naive_info_nce(query, positive, negatives, temperature), rel=1e-9)


def test_info_nce_hand_computed_two_by_two():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    positive = torch.tensor([[0.6, 0.8], [0.8, 0.6]], dtype=torch.float64)
    # Row 0: logits [0.6, 0.8] / 0.5, target 0; row 1: [0.8, 0.6] / 0.5, target 1. Both give log(1 + e^0.4).
    loss = info_nce(query, positive, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.4)), rel=1e-12)


def test_info_nce_rejects_mismatched_shapes():
    query, positive, negatives = batch()
    with pytest.raises(ValueError, match=r"query \(4, 8\).*positive \(3, 8\)"):
        info_nce(query, positive[:3])
    with pytest.raises(ValueError, match=r"negatives \(4, 2, 5\)"):
        info_nce(query, positive, negatives[..., :5])
    with pytest.raises(ValueError, match="temperature"):
        info_nce(query, positive, temperature=0.0)


def constructed_scores() -> tuple[torch.Tensor, torch.Tensor]:
    """Two queries over six candidates; query 0's positive is column 0, query 1's is column 1. Margin 0.1."""
    scores = torch.tensor(
        [
            # s_pos 0.5, threshold 0.6: column 1 (0.7) is a false negative; hardness order 3, 2, 5, 4.
            [0.50, 0.70, 0.55, 0.58, -0.20, 0.10],
            # s_pos 0.2, threshold 0.3: columns 0, 2, 5 are false negatives; only 4 and 3 remain.
            [0.90, 0.20, 0.35, 0.25, 0.29, 0.95],
        ]
    )
    return scores, torch.tensor([0, 1])


def test_select_hard_negatives_excludes_false_negatives_and_takes_the_hardest():
    scores, positive_index = constructed_scores()
    indices, valid = select_hard_negatives(scores, positive_index, margin=0.1, k=3)
    assert indices.shape == valid.shape == (2, 3)
    assert indices[0].tolist() == [3, 2, 5]
    assert valid[0].tolist() == [True, True, True]
    # Fewer than k left for query 1: the two that remain, then one invalid slot.
    assert indices[1, :2].tolist() == [4, 3]
    assert valid[1].tolist() == [True, True, False]


def test_select_hard_negatives_never_picks_own_positive_and_pads_past_the_candidates():
    scores, positive_index = constructed_scores()
    indices, valid = select_hard_negatives(scores, positive_index, margin=0.1, k=8)
    assert indices.shape == valid.shape == (2, 8)
    assert set(indices[0][valid[0]].tolist()) == {2, 3, 4, 5}
    assert set(indices[1][valid[1]].tolist()) == {3, 4}
    for row in range(2):
        assert positive_index[row].item() not in indices[row][valid[row]].tolist()
    # With a huge margin nothing is a false negative, and still the positive is never chosen.
    indices, valid = select_hard_negatives(scores, positive_index, margin=10.0, k=5)
    assert bool(valid.all())
    assert indices[0].tolist() == [1, 3, 2, 5, 4]
    assert indices[1].tolist() == [5, 0, 2, 4, 3]


def test_select_hard_negatives_rejects_bad_arguments():
    scores, positive_index = constructed_scores()
    with pytest.raises(ValueError, match="k >= 1"):
        select_hard_negatives(scores, positive_index, margin=0.1, k=0)
    with pytest.raises(ValueError, match=r"\(2, 6\) and \(3,\)"):
        select_hard_negatives(scores, torch.tensor([0, 1, 2]), margin=0.1, k=2)


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize(("margin", "k"), [(0.1, 8), (0.1, 3), (0.0, 20), (-0.05, 2)])
def test_unime_hard_negative_loss_matches_naive_loop(with_negatives, margin, k):
    query, positive, negatives = batch()
    negatives = negatives if with_negatives else None
    loss = unime_hard_negative_loss(query, positive, negatives, temperature=0.05, margin=margin, k=k)
    expected = naive_unime(query, positive, negatives, 0.05, margin, k)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_unime_hard_negative_loss_masks_false_negatives_that_info_nce_keeps():
    query, positive, negatives = batch()
    # A copy of query 0's own positive among its negatives is a false negative: it scores exactly s_pos, so with a
    # negative margin it is masked and the loss ignores it, while info_nce is pushed by it.
    negatives = negatives.clone()
    negatives[0, 0] = positive[0]
    hard = unime_hard_negative_loss(query, positive, negatives, temperature=0.05, margin=-1e-6, k=20)
    assert hard.item() == pytest.approx(naive_unime(query, positive, negatives, 0.05, -1e-6, 20), rel=1e-9)
    # With no filtering and every candidate kept, the hard-negative loss is InfoNCE.
    everything = unime_hard_negative_loss(query, positive, negatives, temperature=0.05, margin=10.0, k=100)
    assert everything.item() == pytest.approx(info_nce(query, positive, negatives, temperature=0.05).item(), rel=1e-9)


def test_unime_hard_negative_loss_with_every_negative_masked_is_zero_not_nan():
    query, positive, negatives = batch()
    query = query.clone().requires_grad_(True)
    # A margin below -2 masks every candidate (cosines lie in [-1, 1]): only the positive is left, so the loss is 0.
    loss = unime_hard_negative_loss(query, positive, negatives, margin=-3.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(query.grad).all()


@pytest.mark.parametrize("loss_fn", [info_nce, unime_hard_negative_loss])
def test_every_embedding_gets_a_gradient(loss_fn):
    query, positive, negatives = (x.clone().requires_grad_(True) for x in batch())
    loss_fn(query, positive, negatives).backward()
    for name, tensor in (("query", query), ("positive", positive), ("negative", negatives)):
        per_row = tensor.grad.reshape(-1, tensor.shape[-1]).abs().sum(dim=-1)  # one entry per embedding
        assert bool((per_row > 0).all()), f"some {name} embeddings got no gradient: {per_row.tolist()}"


def test_registry_and_get_loss():
    assert LOSSES == {
        "info_nce": info_nce,
        "unime_hard_negative": unime_hard_negative_loss,
        "soft_label_kl": soft_label_kl,
        "text_distill_kl": similarity_kl,
        "rerank_sft": rerank_sft_loss,
        "rerank_contrastive": rerank_contrastive_loss,
        "rerank_unified": unified_rerank_loss,
        "late_interaction": late_interaction_loss,
    }
    assert get_loss("unime_hard_negative") is unime_hard_negative_loss
    with pytest.raises(ValueError, match=r"'nope'.*info_nce.*soft_label_kl.*unime_hard_negative"):
        get_loss("nope")
