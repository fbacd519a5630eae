"""Exact MaxSim scoring against a naive per-pair loop, a hand-computed case, and itself in chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unime.late_interaction
from unime.late_interaction import maxsim, maxsim_packed
from unime.multi_vector import maxsim_scores


def padded_tokens(
    batch: int, length: int, dim: int, *, seed: int, min_tokens: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random L2-normalised token matrices (float64) with right padding of random length and garbage in the padding.

    The padding holds large values on purpose: a scorer that let padding into a max or a sum would be far off.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(batch, length, dim, generator=generator, dtype=torch.float64), dim=-1)
    lengths = torch.randint(min_tokens, length + 1, (batch,), generator=generator)  # [B]
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)  # [B, L]
    tokens = torch.where(mask.unsqueeze(-1), tokens, torch.full_like(tokens, 50.0))  # [B, L, D]
    return tokens, mask


def naive_maxsim(queries, query_mask, documents, document_mask) -> list[list[float]]:
    """Per pair, per query token, per document token: the definition written out as Python loops."""
    scores = []
    for a in range(queries.shape[0]):
        row = []
        for b in range(documents.shape[0]):
            total = 0.0
            for i in range(queries.shape[1]):
                if not query_mask[a, i]:
                    continue
                total += max(
                    float(queries[a, i] @ documents[b, j]) for j in range(documents.shape[1]) if document_mask[b, j]
                )
            row.append(total)
        scores.append(row)
    return scores


def scattered_mask(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Holes anywhere (left padding, gaps), keeping at least one real token per row."""
    generator = torch.Generator().manual_seed(seed)
    holes = torch.rand(mask.shape, generator=generator) < 0.4  # [B, L]
    mask = mask & ~holes
    mask[:, 0] |= ~mask.any(dim=1)  # never empty
    return mask


@pytest.mark.parametrize("mask_kind", ["right_padding", "scattered", "full"])
@pytest.mark.parametrize("seed", [0, 1])
def test_maxsim_matches_naive_loop(mask_kind, seed):
    queries, query_mask = padded_tokens(3, 5, 4, seed=seed)
    documents, document_mask = padded_tokens(4, 7, 4, seed=seed + 10)
    if mask_kind == "scattered":
        query_mask, document_mask = scattered_mask(query_mask, seed), scattered_mask(document_mask, seed + 1)
    elif mask_kind == "full":
        query_mask, document_mask = torch.ones_like(query_mask), torch.ones_like(document_mask)
        queries, documents = F.normalize(queries, dim=-1), F.normalize(documents, dim=-1)
    scores = maxsim(queries, query_mask, documents, document_mask)
    assert scores.shape == (3, 4)
    expected = torch.tensor(naive_maxsim(queries, query_mask, documents, document_mask), dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)


def test_maxsim_hand_computed():
    # Query 0: tokens (1, 0) and (0, 1); query 1: token (1, 1) then one padding token.
    queries = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [9.0, 9.0]]], dtype=torch.float64)
    query_mask = torch.tensor([[True, True], [True, False]])
    # Document 0: tokens (2, 0), (0, 1), (5, 5) where (5, 5) is padding; document 1: (-1, 3), (1, 1), (4, -2).
    documents = torch.tensor(
        [[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[-1.0, 3.0], [1.0, 1.0], [4.0, -2.0]]], dtype=torch.float64
    )
    document_mask = torch.tensor([[True, True, False], [True, True, True]])
    # q0 . d0: token (1,0) -> max(2, 0) = 2; token (0,1) -> max(0, 1) = 1; sum 3.
    # q0 . d1: token (1,0) -> max(-1, 1, 4) = 4; token (0,1) -> max(3, 1, -2) = 3; sum 7.
    # q1 . d0: token (1,1) -> max(2, 1) = 2 (the padding's 10 is ignored); the padded query token adds nothing.
    # q1 . d1: token (1,1) -> max(2, 2, 2) = 2.
    scores = maxsim(queries, query_mask, documents, document_mask)
    torch.testing.assert_close(scores, torch.tensor([[3.0, 7.0], [2.0, 2.0]], dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 10, None])
def test_chunked_equals_unchunked(chunk_size):
    queries, query_mask = padded_tokens(5, 6, 8, seed=3)
    documents, document_mask = padded_tokens(10, 9, 8, seed=4)
    whole = maxsim(queries, query_mask, documents, document_mask, chunk_size=10)
    chunked = maxsim(queries, query_mask, documents, document_mask, chunk_size=chunk_size)
    # The same arithmetic per pair whatever the chunking: equal up to BLAS summation order.
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)


def test_automatic_chunks_under_a_small_budget_equal_one_chunk(monkeypatch):
    queries, query_mask = padded_tokens(3, 4, 8, seed=16)
    documents, document_mask = padded_tokens(12, 9, 8, seed=17)
    whole = maxsim(queries, query_mask, documents, document_mask, chunk_size=12)
    # A budget this small splits the length-sorted documents into runs of different sizes, down to one document.
    monkeypatch.setattr(unime.late_interaction, "DEFAULT_BLOCK_ELEMENTS", 60)
    chunked = maxsim(queries, query_mask, documents, document_mask)
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)


def test_chunked_gradients_equal_unchunked():
    queries, query_mask = padded_tokens(3, 4, 6, seed=5)
    documents, document_mask = padded_tokens(7, 5, 6, seed=6)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = []
    for chunk_size in (7, 2):
        q, d = queries.clone().requires_grad_(True), documents.clone().requires_grad_(True)
        (maxsim(q, query_mask, d, document_mask, chunk_size=chunk_size) * weights).sum().backward()
        grads.append((q.grad, d.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-13)


def test_gradients_flow_to_both_sides_and_pass_gradcheck():
    queries, query_mask = padded_tokens(2, 3, 4, seed=8, min_tokens=2)
    documents, document_mask = padded_tokens(3, 4, 4, seed=9, min_tokens=2)
    queries.requires_grad_(True)
    documents.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, d: maxsim(q, query_mask, d, document_mask, chunk_size=2), (queries, documents)
    )
    maxsim(queries, query_mask, documents, document_mask).sum().backward()
    # Every real query token gets a gradient; padding on either side gets none.
    assert bool((queries.grad.abs().sum(-1)[query_mask] > 0).all())
    assert queries.grad[~query_mask].abs().sum() == 0
    assert documents.grad[~document_mask].abs().sum() == 0
    assert documents.grad[document_mask].abs().sum() > 0


def test_fully_masked_query_or_document_is_an_error_naming_it():
    queries, query_mask = padded_tokens(3, 4, 4, seed=11)
    documents, document_mask = padded_tokens(5, 4, 4, seed=12)
    query_mask[1] = False
    with pytest.raises(ValueError, match=r"query 1 has no unmasked token"):
        maxsim(queries, query_mask, documents, document_mask)
    query_mask[1, 0] = True
    document_mask[3] = False
    with pytest.raises(ValueError, match=r"document 3 has no unmasked token"):
        maxsim(queries, query_mask, documents, document_mask)


def test_bad_shapes_and_masks_are_errors():
    queries, query_mask = padded_tokens(2, 4, 4, seed=13)
    documents, document_mask = padded_tokens(3, 5, 4, seed=14)
    with pytest.raises(ValueError, match=r"query mask must be \[batch, tokens\] = \(2, 4\)"):
        maxsim(queries, query_mask[:, :3], documents, document_mask)
    with pytest.raises(ValueError, match="document mask must be boolean"):
        maxsim(queries, query_mask, documents, document_mask.float())
    with pytest.raises(ValueError, match=r"query token matrices must be \[batch, tokens, dim\]"):
        maxsim(queries[0], query_mask[0], documents, document_mask)
    with pytest.raises(ValueError, match="differ in dimension: 4 and 3"):
        maxsim(queries, query_mask, documents[..., :3], document_mask)
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        maxsim(queries, query_mask, documents, document_mask, chunk_size=0)


def test_no_documents_gives_an_empty_score_matrix():
    queries, query_mask = padded_tokens(2, 4, 4, seed=15)
    documents = torch.zeros(0, 3, 4, dtype=torch.float64)
    scores = maxsim(queries, query_mask, documents, torch.zeros(0, 3, dtype=torch.bool))
    assert scores.shape == (2, 0)


def test_bfloat16_compute_stays_within_its_rounding_of_the_exact_scores_and_keeps_the_ranking():
    """Unit tokens of dim 128, 32 queries of up to 24 tokens against 200 documents of up to 300."""
    queries, query_mask = padded_tokens(32, 24, 128, seed=20)
    documents, document_mask = padded_tokens(200, 300, 128, seed=21)
    queries, documents = queries.float(), documents.float()
    exact = maxsim(queries, query_mask, documents, document_mask)  # [32, 200]
    rounded = maxsim(queries, query_mask, documents, document_mask, compute_dtype=torch.bfloat16)
    assert rounded.dtype == torch.float32
    assert not torch.equal(rounded, exact), "the products were not computed in bfloat16"
    # Per query token: both vectors rounded to 8 significant bits (at most 2 * 2**-8 of a cosine) and the product
    # rounded once more (2**-8): 3 * 2**-8 at most, summed over the query's real tokens.
    bound = 3 * 2**-8 * query_mask.sum(dim=1, keepdim=True)  # [32, 1]
    assert ((rounded - exact).abs() <= bound).all(), (rounded - exact).abs().max()
    top_exact, top_rounded = exact.topk(10, dim=1).indices, rounded.topk(10, dim=1).indices  # [32, 10]
    kept = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_exact, top_rounded, strict=True))
    assert kept / top_exact.numel() >= 0.9
    # The list form (`encode(..., output="multi_vector")`'s) passes the compute dtype on.
    listed = maxsim_scores(
        [q[m] for q, m in zip(queries, query_mask, strict=True)],
        [d[m] for d, m in zip(documents, document_mask, strict=True)],
        compute_dtype=torch.bfloat16,
    )
    torch.testing.assert_close(listed, rounded, rtol=0, atol=1e-5)


def test_bfloat16_compute_gives_float32_gradients_close_to_the_exact_ones():
    queries, query_mask = padded_tokens(3, 6, 16, seed=22)
    documents, document_mask = padded_tokens(5, 9, 16, seed=23)
    grads = []
    for dtype in (None, torch.bfloat16):
        q, d = queries.float().requires_grad_(), documents.float().requires_grad_()
        maxsim(q, query_mask, d, document_mask, compute_dtype=dtype).sum().backward()
        grads.append((q.grad, d.grad))
    for exact, rounded in zip(*grads, strict=True):
        assert rounded.dtype == torch.float32
        torch.testing.assert_close(rounded, exact, atol=0.1, rtol=0.02)


def packed(documents: torch.Tensor, document_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded matrices as the embedding store keeps them: real tokens one document after another, and lengths."""
    return documents[document_mask], document_mask.sum(dim=1)  # [T, D], [Bd]


@pytest.mark.parametrize("block_elements", [1, 40, 2**20])  # a document per run, a few per run, all in one run
@pytest.mark.parametrize("mask_kind", ["right_padding", "scattered"])
def test_packed_documents_score_as_the_padded_ones(block_elements, mask_kind):
    queries, query_mask = padded_tokens(3, 5, 8, seed=30)
    documents, document_mask = padded_tokens(9, 11, 8, seed=31)
    if mask_kind == "scattered":
        query_mask, document_mask = scattered_mask(query_mask, 32), scattered_mask(document_mask, 33)
    tokens, lengths = packed(documents, document_mask)
    scores = maxsim_packed(queries, query_mask, tokens, lengths, block_elements=block_elements)
    expected = torch.tensor(naive_maxsim(queries, query_mask, documents, document_mask), dtype=torch.float64)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)


def test_packed_float16_tokens_in_bfloat16_agree_with_the_padded_scoring():
    # The index's case: float16 stored tokens, cast run by run; bf16 compute rounds as maxsim's does.
    queries, query_mask = padded_tokens(4, 20, 64, seed=34)
    documents, document_mask = padded_tokens(50, 60, 64, seed=35)
    queries, documents = queries.float(), documents.half()
    tokens, lengths = packed(documents, document_mask)
    for dtype in (None, torch.bfloat16):
        padded_scores = maxsim(queries, query_mask, documents, document_mask, compute_dtype=dtype)
        packed_scores = maxsim_packed(queries, query_mask, tokens, lengths, compute_dtype=dtype, block_elements=4000)
        assert packed_scores.dtype == torch.float32
        torch.testing.assert_close(packed_scores, padded_scores, rtol=0, atol=1e-5)


def test_packed_scoring_refuses_malformed_documents():
    queries, query_mask = padded_tokens(2, 4, 4, seed=36)
    tokens = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="document 1 has no token"):
        maxsim_packed(queries, query_mask, tokens, torch.tensor([3, 0, 3]))
    with pytest.raises(ValueError, match="summing to the 6 token rows"):
        maxsim_packed(queries, query_mask, tokens, torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"must be \[total tokens, 4\]"):
        maxsim_packed(queries, query_mask, tokens[:, :3], torch.tensor([3, 3]))
    assert maxsim_packed(queries, query_mask, tokens[:0], torch.tensor([], dtype=torch.long)).shape == (2, 0)
