"""Exact late-interaction (MaxSim) scoring of padded token matrices.

A multi-vector model gives every query and document a matrix of token vectors; ColBERT-style late interaction
scores a pair by matching each query token with its most similar document token and summing those maxima:

    score(q, d) = sum over real query tokens i of max over real document tokens j of q_i . d_j

Matrices of one batch are padded to a common length; a boolean mask (True = a real token) travels with each one.
Padded query tokens add nothing and padded document tokens are never the maximum. A query or document with no
real token has no score at all (an empty sum or an empty max), so it is an error naming it rather than a 0 or NaN.
"""

from __future__ import annotations

import torch

# The similarity block of one chunk holds at most this many elements (128 MiB in float32) unless a caller chooses
# the chunk size: large enough that a chunk is one fast matmul, small enough for any machine scoring a corpus.
DEFAULT_BLOCK_ELEMENTS = 2**25


def check_token_matrices(name: str, tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise a ValueError naming `name` unless `tokens` is `[B, L, D]` with a boolean `[B, L]` mask and every row
    keeps at least one token.

    Args:
        name: what the matrices are (e.g. "query", "document"), used in the message.
        tokens: `[B, L, D]` padded token vectors.
        mask: `[B, L]` True for real tokens, False for padding.
    """
    if tokens.dim() != 3:
        raise ValueError(f"{name} token matrices must be [batch, tokens, dim]; got shape {tuple(tokens.shape)}")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"{name} mask must be [batch, tokens] = {tuple(tokens.shape[:2])}; got shape {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} mask must be boolean (True = a real token); got dtype {mask.dtype}")
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()  # indices of rows without a real token
    if empty:
        raise ValueError(f"{name} {empty[0]} has no unmasked token ({len(empty)} such {name} rows: {empty[:10]})")


def _maxsim_block(
    queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor, document_mask: torch.Tensor
) -> torch.Tensor:
    """MaxSim of every query against every document of one chunk, as one matmul; inputs already checked."""
    batch_q, len_q, dim = queries.shape
    batch_d, len_d, _ = documents.shape
    # One [Bq*Lq, Bd*Ld] matmul instead of a 4-D einsum: BLAS does all the work.
    similarity = queries.reshape(-1, dim) @ documents.reshape(-1, dim).T  # [Bq*Lq, Bd*Ld]
    similarity = similarity.view(batch_q * len_q, batch_d, len_d)  # [Bq*Lq, Bd, Ld]
    # Padding must never win the max: -inf there (every document has a real token, so no row is all -inf).
    similarity = similarity.masked_fill(~document_mask.unsqueeze(0), float("-inf"))  # [Bq*Lq, Bd, Ld]
    best = similarity.amax(dim=2).view(batch_q, len_q, batch_d)  # [Bq, Lq, Bd]
    # Padded query tokens add nothing; `where` rather than a multiply, so whatever their padding holds never counts.
    best = torch.where(query_mask.unsqueeze(2), best, best.new_zeros(()))  # [Bq, Lq, Bd]
    return best.sum(dim=1)  # [Bq, Bd]


def maxsim(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    documents: torch.Tensor,
    document_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact late-interaction scores of every query against every document.

    Differentiable with respect to both sides (the gradient of a max flows to the document token that attains it).
    Documents are scored in chunks so that the `[Bq*Lq, chunk*Ld]` similarity block stays bounded on large
    corpora; the result does not depend on the chunk size.

    Args:
        queries: `[Bq, Lq, D]` query token vectors, padded.
        query_mask: `[Bq, Lq]` boolean, True for real query tokens.
        documents: `[Bd, Ld, D]` document token vectors, padded.
        document_mask: `[Bd, Ld]` boolean, True for real document tokens.
        chunk_size: documents scored per chunk; None picks the largest chunk whose similarity block holds at most
            `DEFAULT_BLOCK_ELEMENTS` elements.

    Returns:
        `[Bq, Bd]` scores: for query a and document b, the sum over a's real tokens of the largest dot product with
        a real token of b. With L2-normalised tokens each term is a cosine, so a score lies in [-Lq_a, Lq_a].

    Raises:
        ValueError: for mismatched shapes or dimensions, a non-boolean mask, a query or document with no real token
            (naming its index), or a chunk size below 1.
    """
    check_token_matrices("query", queries, query_mask)
    check_token_matrices("document", documents, document_mask)
    if queries.shape[2] != documents.shape[2]:
        raise ValueError(
            f"query and document token vectors differ in dimension: {queries.shape[2]} and {documents.shape[2]}"
        )
    if chunk_size is None:
        per_document = max(1, queries.shape[0] * queries.shape[1] * documents.shape[1])
        chunk_size = max(1, DEFAULT_BLOCK_ELEMENTS // per_document)
    if chunk_size < 1:
        raise ValueError(f"maxsim needs chunk_size >= 1, got {chunk_size}")
    if documents.shape[0] == 0:
        return queries.new_zeros(queries.shape[0], 0)  # [Bq, 0]
    blocks = [
        _maxsim_block(
            queries, query_mask, documents[start : start + chunk_size], document_mask[start : start + chunk_size]
        )
        for start in range(0, documents.shape[0], chunk_size)
    ]  # each [Bq, chunk]
    return torch.cat(blocks, dim=1)  # [Bq, Bd]


__all__ = ["DEFAULT_BLOCK_ELEMENTS", "check_token_matrices", "maxsim"]
