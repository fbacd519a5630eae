"""The late-interaction loss against a naive per-query loop, hand-computed cases, gradcheck, and two ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.losses.test_distributed import free_port, join_gloo_group, rows_of
from unime.late_interaction import maxsim
from unime.losses import late_interaction_loss
from unime.losses.late_interaction import late_interaction_candidates

DIM = 6


def tokens(*shape: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[*shape, L, DIM]` L2-normalised float64 token matrices, right-padded to the given real lengths (one per
    matrix, flattened order), with large garbage in the padding so a scorer that reads it is far off."""
    length = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    values = F.normalize(torch.randn(*shape, length, DIM, generator=generator, dtype=torch.float64), dim=-1)
    mask = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).view(*shape, length)  # [..., L]
    return torch.where(mask.unsqueeze(-1), values, torch.full_like(values, 30.0)), mask


def example(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """4 queries of 2-5 tokens, positives of 3-7 tokens near their queries, 2 unrelated negatives each of 1-4."""
    query, query_mask = tokens(4, lengths=[2, 5, 3, 4], seed=seed)
    positive, positive_mask = tokens(4, lengths=[7, 3, 6, 4], seed=seed + 1)
    # Positives share their query's tokens (plus noise), so the margin rule and the hard negatives both matter.
    shared = min(query.shape[1], positive.shape[1])
    noisy = F.normalize(query[:, :shared] + 0.8 * positive[:, :shared], dim=-1)  # [4, shared, D]
    positive = torch.cat([noisy, positive[:, shared:]], dim=1)
    positive = torch.where(positive_mask.unsqueeze(-1), positive, torch.full_like(positive, 30.0))
    negatives, negatives_mask = tokens(4, 2, lengths=[1, 4, 2, 3, 4, 4, 1, 2], seed=seed + 2)
    return query, query_mask, positive, positive_mask, negatives, negatives_mask


def pair_maxsim(query, query_mask, document, document_mask) -> float:
    """The definition for one pair: each real query token's best real document token, summed."""
    real_document = [document[j] for j in range(document.shape[0]) if document_mask[j]]
    return sum(max(float(query[i] @ token) for token in real_document) for i in range(query.shape[0]) if query_mask[i])


def naive_loss(
    query, query_mask, positive, positive_mask, negatives, negatives_mask, *, temperature, margin, k, normalize
):
    """Per query: score every candidate of the batch pair by pair, filter, pick, cross-entropy; then the mean."""
    candidates = [(positive[j], positive_mask[j]) for j in range(positive.shape[0])]
    if negatives is not None:
        candidates += [
            (negatives[j, m], negatives_mask[j, m])
            for j in range(negatives.shape[0])
            for m in range(negatives.shape[1])
        ]
    total = 0.0
    for i in range(query.shape[0]):
        scores = [pair_maxsim(query[i], query_mask[i], doc, doc_mask) for doc, doc_mask in candidates]
        if normalize:
            scores = [s / int(query_mask[i].sum()) for s in scores]
        s_pos = scores[i]
        if k is None:
            logits = [s_pos] + [s for j, s in enumerate(scores) if j != i]
        else:
            kept = sorted((s for j, s in enumerate(scores) if j != i and s <= s_pos + margin), reverse=True)[:k]
            logits = [s_pos, *kept]
        logits = [s / temperature for s in logits]
        total += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    return total / query.shape[0]


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize(("k", "margin"), [(None, 0.0), (8, 0.1), (2, 0.1), (20, -0.05)])
@pytest.mark.parametrize("normalize", [True, False])
def test_loss_matches_naive_loop(with_negatives, k, margin, normalize):
    query, query_mask, positive, positive_mask, negatives, negatives_mask = example()
    if not with_negatives:
        negatives = negatives_mask = None
    settings = {"temperature": 0.05 if normalize else 1.0, "margin": margin, "k": k, "normalize": normalize}
    loss = late_interaction_loss(query, query_mask, positive, positive_mask, negatives, negatives_mask, **settings)
    expected = naive_loss(query, query_mask, positive, positive_mask, negatives, negatives_mask, **settings)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # Chunking the candidates bounds memory and changes nothing.
    chunked = late_interaction_loss(
        query, query_mask, positive, positive_mask, negatives, negatives_mask, chunk_size=1, **settings
    )
    assert chunked.item() == pytest.approx(loss.item(), rel=1e-12)


def hand_batch() -> tuple[torch.Tensor, ...]:
    """Two queries, two positives, no mined negatives; every token written out (30s are padding)."""
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [30.0, 30.0]]], dtype=torch.float64)
    query_mask = torch.tensor([[True, True], [True, False]])
    positive = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [30.0, 30.0]]], dtype=torch.float64)
    positive_mask = torch.tensor([[True, True], [True, False]])
    return query, query_mask, positive, positive_mask


def test_hand_computed_info_nce_and_hard_negative_cases():
    query, query_mask, positive, positive_mask = hand_batch()
    # MaxSim: q0.p0 = 1 + 1 = 2; q0.p1 = 0.6 + 0.8 = 1.4; q1.p0 = max(1, 0) = 1; q1.p1 = 0.6.
    raw = maxsim(query, query_mask, positive, positive_mask)
    torch.testing.assert_close(raw, torch.tensor([[2.0, 1.4], [1.0, 0.6]], dtype=torch.float64))
    # Normalised by query length (2 and 1): q0 -> [1.0, 0.7], q1 -> [1.0, 0.6]. At temperature 0.1 the logits are
    # q0 [10, 7] (target 0) and q1 [10, 6] (target 1): losses log(1 + e^-3) and log(1 + e^4).
    info_nce = late_interaction_loss(query, query_mask, positive, positive_mask, temperature=0.1, k=None)
    assert info_nce.item() == pytest.approx((math.log(1 + math.exp(-3)) + math.log(1 + math.exp(4))) / 2, rel=1e-12)
    # Margin 0.1: for q1 (s_pos 0.6) the candidate p0 at 1.0 > 0.7 is a false negative and dropped, leaving only its
    # positive (loss 0); q0 keeps p1 (0.7 <= 1.1). The mean is log(1 + e^-3) / 2.
    hard = late_interaction_loss(query, query_mask, positive, positive_mask, temperature=0.1, margin=0.1, k=1)
    assert hard.item() == pytest.approx(math.log(1 + math.exp(-3)) / 2, rel=1e-12)
    # Without normalisation the raw sums are the scores: q0 [2, 1.4], q1 [1, 0.6] at temperature 1.
    raw_loss = late_interaction_loss(
        query, query_mask, positive, positive_mask, temperature=1.0, k=None, normalize=False
    )
    expected = (math.log(1 + math.exp(-0.6)) + math.log(1 + math.exp(0.4))) / 2
    assert raw_loss.item() == pytest.approx(expected, rel=1e-12)


# A hand-made score matrix (two queries, six candidates: p0, p1, then q0's two negatives, then q1's two).
DESIGNED = [
    # s_pos 0.5, margin 0.1: column 1 (0.7) is a false negative; by hardness 3, 2, 5, 4.
    [0.50, 0.70, 0.55, 0.58, -0.20, 0.10],
    # s_pos 0.2: columns 0, 2 and 5 are false negatives; only 4 and 3 remain.
    [0.90, 0.20, 0.35, 0.25, 0.29, 0.95],
]


def designed_batch() -> tuple[torch.Tensor, ...]:
    """Token matrices whose MaxSim scores are exactly DESIGNED.

    Query i is the one token e_i (plus a padding token). Candidate c holds the token (S[0][c], S[1][c]), whose dot
    product with e_i is S[i][c], and a weaker decoy (0.3 and 0.4 lower on each axis) that never wins the max.
    """
    scores = torch.tensor(DESIGNED, dtype=torch.float64)  # [2, 6]
    query = torch.tensor([[[1.0, 0.0], [7.0, 7.0]], [[0.0, 1.0], [7.0, 7.0]]], dtype=torch.float64)
    query_mask = torch.tensor([[True, False], [True, False]])
    best = scores.T  # [6, 2]
    decoy = best - torch.tensor([0.3, 0.4], dtype=torch.float64)  # [6, 2]
    candidates = torch.stack([decoy, best], dim=1)  # [6, 2 tokens, 2]
    positive = candidates[:2]  # [2, 2, 2]
    negatives = candidates[2:].view(2, 2, 2, 2)  # [2 queries, 2 negatives, 2 tokens, 2]
    ones = torch.ones(2, 2, dtype=torch.bool)
    return query, query_mask, positive, ones, negatives, torch.ones(2, 2, 2, dtype=torch.bool)


def test_false_negative_filter_and_k_hardest_on_a_designed_score_matrix():
    query, query_mask, positive, positive_mask, negatives, negatives_mask = designed_batch()
    candidates, candidate_mask, positive_index = late_interaction_candidates(
        positive, positive_mask, negatives, negatives_mask, gather=True
    )
    assert positive_index.tolist() == [0, 1]
    scores = maxsim(query, query_mask, candidates, candidate_mask)
    torch.testing.assert_close(scores, torch.tensor(DESIGNED, dtype=torch.float64))

    def cross_entropy(kept: list[float]) -> float:
        logits = [s / 0.05 for s in kept]
        return -logits[0] + math.log(sum(math.exp(x) for x in logits))

    loss = late_interaction_loss(
        query, query_mask, positive, positive_mask, negatives, negatives_mask, temperature=0.05, margin=0.1, k=3
    )
    # q0 keeps its positive and columns 3, 2, 5 (k = 3; 1 is a false negative, 4 is the 4th hardest);
    # q1 keeps its positive and columns 4, 3 only (0, 2, 5 are false negatives).
    expected = (cross_entropy([0.50, 0.58, 0.55, 0.10]) + cross_entropy([0.20, 0.29, 0.25])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # Every candidate kept (k=None) is a different, larger loss: the filter really removed something.
    everything = late_interaction_loss(
        query, query_mask, positive, positive_mask, negatives, negatives_mask, temperature=0.05, k=None
    )
    assert everything.item() > loss.item() + 1.0


def test_gradients_reach_every_real_token_and_pass_gradcheck():
    query, query_mask, positive, positive_mask, negatives, negatives_mask = example(seed=3)
    leaves = [x.clone().requires_grad_(True) for x in (query, positive, negatives)]
    late_interaction_loss(
        leaves[0], query_mask, leaves[1], positive_mask, leaves[2], negatives_mask, temperature=0.05, k=None
    ).backward()
    for name, leaf, mask in zip(
        ("query", "positive", "negatives"), leaves, (query_mask, positive_mask, negatives_mask), strict=True
    ):
        per_matrix = leaf.grad.abs().sum(dim=-1).masked_fill(~mask, 0).sum(dim=-1)  # one entry per token matrix
        assert bool((per_matrix > 0).all()), f"some {name} matrices got no gradient: {per_matrix.tolist()}"
        assert leaf.grad[~mask].abs().sum() == 0, f"{name} padding got a gradient"

    small = [x[:2].clone().requires_grad_(True) for x in (query, positive, negatives)]

    def loss_of(q, p, n):
        return late_interaction_loss(
            q, query_mask[:2], p, positive_mask[:2], n, negatives_mask[:2], temperature=0.5, margin=0.1, k=2
        )

    assert torch.autograd.gradcheck(loss_of, tuple(small))


def test_bad_inputs_are_errors_naming_them():
    query, query_mask, positive, positive_mask, negatives, negatives_mask = example()
    empty = negatives_mask.clone()
    empty[2, 1] = False
    with pytest.raises(ValueError, match="negative 1 of query 2 has no unmasked token"):
        late_interaction_loss(query, query_mask, positive, positive_mask, negatives, empty)
    empty = positive_mask.clone()
    empty[3] = False
    with pytest.raises(ValueError, match="positive 3 has no unmasked token"):
        late_interaction_loss(query, query_mask, positive, empty)
    with pytest.raises(ValueError, match="needs a boolean negatives_mask"):
        late_interaction_loss(query, query_mask, positive, positive_mask, negatives)
    with pytest.raises(ValueError, match="negatives_mask without negatives"):
        late_interaction_loss(query, query_mask, positive, positive_mask, None, negatives_mask)
    with pytest.raises(ValueError, match=r"one positive per query"):
        late_interaction_loss(query, query_mask, positive[:3], positive_mask[:3])
    with pytest.raises(ValueError, match=r"negatives \[batch, num_negatives, tokens, dim\]"):
        late_interaction_loss(query, query_mask, positive, positive_mask, negatives[..., :3], negatives_mask)
    with pytest.raises(ValueError, match="temperature"):
        late_interaction_loss(query, query_mask, positive, positive_mask, temperature=0.0)
    with pytest.raises(ValueError, match="k >= 1"):
        late_interaction_loss(query, query_mask, positive, positive_mask, k=0)


# ---------------------------------------------------------------------------------------------------------------
# Two gloo ranks against one process on the concatenated batch (as tests/losses/test_distributed.py does for the
# single-vector losses). Each rank trims its matrices to its own longest real token, so ranks hold different token
# lengths and the loss must pad them to one length before gathering.
# ---------------------------------------------------------------------------------------------------------------
WORLD = 2
SPLITS = {"even": (2, 2), "uneven": (3, 1)}
KS = {"info_nce": None, "hard_negative": 3}


def shard(full: tuple[torch.Tensor, ...], rows: slice) -> list[torch.Tensor]:
    """This rank's rows, each side trimmed to the longest real matrix among them."""
    out = []
    for values, mask in zip(full[0::2], full[1::2], strict=True):
        values, mask = values[rows], mask[rows]
        longest = int(mask.reshape(-1, mask.shape[-1]).any(dim=0).nonzero().max()) + 1
        out += [values[..., :longest, :].clone(), mask[..., :longest].clone()]
    return out


def _worker(r: int, port: int, out_dir: str) -> None:
    """One rank: every case on its rows, loss and gradients averaged over ranks like DDP, saved for the parent."""
    join_gloo_group(r, port, WORLD)
    try:
        full = example(seed=5)
        batch = full[0].shape[0]
        results = {}
        for split_name, split in SPLITS.items():
            rows = rows_of(split, r)
            for k_name, k in KS.items():
                query, query_mask, positive, positive_mask, negatives, negatives_mask = shard(full, rows)
                leaves = [x.requires_grad_(True) for x in (query, positive, negatives)]
                loss = late_interaction_loss(
                    query, query_mask, positive, positive_mask, negatives, negatives_mask, temperature=0.05, k=k
                )
                # DDP averages over ranks: weigh this rank's mean by its share of the batch.
                scaled = loss * split[r] * WORLD / batch
                scaled.backward()
                averaged = scaled.detach().clone()
                dist.all_reduce(averaged)
                grads = []
                for leaf, whole in zip(leaves, full[0::2], strict=True):
                    grad = torch.zeros_like(whole)
                    grad[rows][..., : leaf.shape[-2], :] = leaf.grad
                    dist.all_reduce(grad)
                    grads.append(grad / WORLD)
                results[(split_name, k_name)] = {"loss": averaged / WORLD, "grads": grads}
        torch.save(results, Path(out_dir) / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Run both ranks once for the module (the fixture's name marks its tests slow, see tests/conftest.py)."""
    out_dir = tmp_path_factory.mktemp("late_interaction_ranks")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("k_name", list(KS))
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_two_ranks_match_one_process_on_the_concatenated_batch(rank_results, split_name, k_name):
    full = example(seed=5)
    # The ranks really held different token lengths, so the padding across ranks was exercised.
    lengths = [[x.shape[-2] for x in shard(full, rows_of(SPLITS[split_name], r))] for r in range(WORLD)]
    assert lengths[0] != lengths[1]
    query, query_mask, positive, positive_mask, negatives, negatives_mask = full
    leaves = [x.clone().requires_grad_(True) for x in (query, positive, negatives)]
    loss = late_interaction_loss(
        leaves[0], query_mask, leaves[1], positive_mask, leaves[2], negatives_mask, temperature=0.05, k=KS[k_name]
    )
    loss.backward()
    for res in rank_results:
        case = res[(split_name, k_name)]
        torch.testing.assert_close(case["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for name, got, leaf in zip(("query", "positive", "negatives"), case["grads"], leaves, strict=True):
            torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12, msg=f"{name} gradients differ")
    assert leaves[2].grad.abs().sum() > 0
