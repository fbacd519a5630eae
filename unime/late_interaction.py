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

# The similarity block of one chunk holds at most this many elements (4 MiB in float32, 2 in bfloat16) unless a
# caller chooses the chunk size: large enough that a chunk is one efficient matmul, small enough to stay in cache
# between the matmul and the max (on one CPU thread, 2**20 was 2-3x faster than 2**24 here, and within noise of the
# best of 2**18 to 2**23 in float32 and bfloat16) and bounded on any corpus.
DEFAULT_BLOCK_ELEMENTS = 2**20


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


def _extent(mask: torch.Tensor) -> torch.Tensor:
    """`[B]` one past the last real token of each row of a `[B, L]` mask: the columns a row needs kept."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # [L]
    return (mask * positions).amax(dim=1)  # [B]


def _source_rows(document_mask: torch.Tensor) -> torch.Tensor:
    """`[Bd, Ld]` for each document slot, the row of the flattened `[Bd * Ld, D]` documents it reads: its own for a
    real token, the document's first real token for a padded slot.

    A copy can never beat the token it copies, so the max over all slots is the max over real tokens: no -inf pass
    over the similarity block is needed. The gradient of a copy flows back to the token it copies.
    """
    batch, length = document_mask.shape
    slots = torch.arange(length, device=document_mask.device).unsqueeze(0)  # [1, Ld]
    first_real = document_mask.to(torch.uint8).argmax(dim=1, keepdim=True)  # [Bd, 1]
    source = torch.where(document_mask, slots, first_real)  # [Bd, Ld]
    return source + torch.arange(batch, device=document_mask.device).unsqueeze(1) * length  # [Bd, Ld]


def _real_query_tokens(
    queries: torch.Tensor, query_mask: torch.Tensor, compute_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real tokens of every query, in row order and in the compute dtype (`[Tq, D]`: one matrix for the whole
    query batch, so padded query tokens are never multiplied), and `[Tq]` the query each one belongs to."""
    return queries[query_mask].to(compute_dtype), query_mask.nonzero()[:, 0]


def _sum_per_query(best: torch.Tensor, owner: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """`[Bq, Bd]` scores from `[Bd, Tq]` per-token maxima: each query's tokens summed (padded query tokens never
    entered, so whatever their padding holds never counts)."""
    scores = torch.zeros(best.shape[0], num_queries, dtype=dtype, device=best.device)  # [Bd, Bq]
    return scores.index_add(1, owner, best.to(dtype)).T.contiguous()  # [Bq, Bd]


def _document_chunks(extents: list[int], num_query_tokens: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """(start, stop) runs over documents sorted by extent: `chunk_size` documents each, or (None) as many as keep
    the `[query tokens, documents * extent]` block within `DEFAULT_BLOCK_ELEMENTS`."""
    runs, start = [], 0
    while start < len(extents):
        if chunk_size is not None:
            count = chunk_size
        else:
            # Extents grow along the run: shrink the count until its longest document fits the budget too.
            count = max(1, DEFAULT_BLOCK_ELEMENTS // (num_query_tokens * extents[start]))
            while count > 1 and num_query_tokens * count * extents[min(start + count, len(extents)) - 1] > (
                DEFAULT_BLOCK_ELEMENTS
            ):
                count = max(
                    1, DEFAULT_BLOCK_ELEMENTS // (num_query_tokens * extents[min(start + count, len(extents)) - 1])
                )
        runs.append((start, min(start + count, len(extents))))
        start += count
    return runs


def maxsim(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    documents: torch.Tensor,
    document_mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Exact late-interaction scores of every query against every document.

    Differentiable with respect to both sides (the gradient of a max flows to the document token that attains it).
    Only real query tokens are multiplied (one `[tokens, D]` matrix for the whole query batch), and documents are
    scored in chunks of similar length, each trimmed to its longest document, so that padding costs little and
    the similarity block stays bounded on large corpora. The result does not depend on the chunking.

    Args:
        queries: `[Bq, Lq, D]` query token vectors, padded.
        query_mask: `[Bq, Lq]` boolean, True for real query tokens.
        documents: `[Bd, Ld, D]` document token vectors, padded (what padded slots hold is never read). They may be
            stored in another dtype (float16): each chunk is cast to the compute dtype as it is scored.
        document_mask: `[Bd, Ld]` boolean, True for real document tokens.
        chunk_size: documents scored per chunk; None sizes each chunk so that its similarity block holds at most
            `DEFAULT_BLOCK_ELEMENTS` elements (or holds one document).
        compute_dtype: the dtype of the products and of the max (None: the queries' own). `torch.bfloat16` scores
            as colpali-engine does with its bf16 models: token vectors rounded to bf16 (8 significant bits),
            products summed in float32 inside the matmul, each similarity rounded to bf16 before the max, and the
            sum over query tokens in the queries' dtype. Where the matmul has bf16 units (a CPU with AMX, a GPU) it
            is several times faster (`bench/late_interaction.py`); a ranking changes only between documents whose
            scores differ by less than that rounding (about 0.4% of a cosine per query token).

    Returns:
        `[Bq, Bd]` scores in the queries' dtype: for query a and document b, the sum over a's real tokens of the
        largest dot product with a real token of b. With L2-normalised tokens each term is a cosine, so a score
        lies in [-Lq_a, Lq_a].

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
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"maxsim needs chunk_size >= 1, got {chunk_size}")
    query_tokens, owner = _real_query_tokens(queries, query_mask, compute_dtype or queries.dtype)  # [Tq, D], [Tq]
    document_rows = documents.reshape(-1, documents.shape[-1])  # [Bd * Ld, D]
    sources = _source_rows(document_mask)  # [Bd, Ld]
    extents = _extent(document_mask)  # [Bd]
    order = extents.argsort()  # [Bd] documents by extent, so a chunk's trim fits all its documents
    sorted_extents = extents[order].tolist()
    best_parts = []
    for start, stop in _document_chunks(sorted_extents, max(1, query_tokens.shape[0]), chunk_size):
        length = sorted_extents[stop - 1]
        # One gather per chunk picks its documents, trims them to its longest and fills their padding (cast to the
        # compute dtype only here: a chunk at a time, in cache).
        rows = sources[order[start:stop], :length].reshape(-1)  # [n*Lc]
        chunk = document_rows.index_select(0, rows).to(query_tokens.dtype)  # [n*Lc, D]
        # One [n*Lc, Tq] matmul per chunk (BLAS does the work); the max runs down the document tokens, across
        # contiguous rows of query tokens, which vectorises whatever the documents' length.
        similarity = chunk @ query_tokens.T  # [n*Lc, Tq]
        best_parts.append(similarity.view(stop - start, length, -1).amax(dim=1))  # [n, Tq]
    if not best_parts:
        return queries.new_zeros(queries.shape[0], 0)  # [Bq, 0]: no documents
    best = torch.cat(best_parts)[order.argsort()]  # [Bd, Tq], back in the documents' order
    return _sum_per_query(best, owner, queries.shape[0], queries.dtype)  # [Bq, Bd]


def _packed_runs(lengths: list[int], num_query_tokens: int, block_elements: int) -> list[tuple[int, int]]:
    """(start, stop) runs of consecutive documents whose tokens together keep the `[run tokens, query tokens]`
    similarity block within `block_elements` (a longer document is a run of its own)."""
    runs, start, tokens = [], 0, 0
    for stop, length in enumerate(lengths):
        if stop > start and (tokens + length) * num_query_tokens > block_elements:
            runs.append((start, stop))
            start, tokens = stop, 0
        tokens += length
    if start < len(lengths):
        runs.append((start, len(lengths)))
    return runs


def maxsim_packed(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """`maxsim` against documents packed one after another, as the embedding store keeps them: no padding.

    Searching a stored corpus (`unime.multi_vector_index`) scores documents of many lengths that sit back to back in
    memory (`[total tokens, D]` and their lengths). Padding them to `[Bd, Ld, D]` for `maxsim` would copy every
    token twice more; here each run of documents is one `[run tokens, D] @ [D, Tq]` matmul on a slice of `tokens`
    as it lies, and a document's maximum is a segment maximum over its rows of the similarity block (narrower than
    the tokens whenever the queries have fewer tokens than dimensions: 20 against 128 in a search). Equal to
    `maxsim` on the padded matrices up to float summation order (`tests/test_late_interaction.py`). For scoring,
    not training: no gradient is promised.

    Args:
        queries: `[Bq, Lq, D]` query token vectors, padded.
        query_mask: `[Bq, Lq]` boolean, True for real query tokens.
        tokens: `[T, D]` the documents' real token vectors, document after document (any float dtype: each run is
            cast to the compute dtype as it is scored).
        lengths: `[Bd]` integer, tokens of each document (each at least 1), summing to T.
        compute_dtype: as in `maxsim`.
        block_elements: the largest similarity block of one run (a longer document is scored alone).

    Returns:
        `[Bq, Bd]` scores in the queries' dtype.

    Raises:
        ValueError: for a malformed query batch, a dimension mismatch, lengths that are not positive or do not add
            up to the tokens' rows (naming the first empty document).
    """
    check_token_matrices("query", queries, query_mask)
    if tokens.dim() != 2 or tokens.shape[1] != queries.shape[2]:
        raise ValueError(
            f"packed document tokens must be [total tokens, {queries.shape[2]}]; got shape {tuple(tokens.shape)}"
        )
    if lengths.dim() != 1 or int(lengths.sum()) != tokens.shape[0]:
        raise ValueError(
            f"document lengths must be one count per document summing to the {tokens.shape[0]} token rows; got "
            f"shape {tuple(lengths.shape)} summing to {int(lengths.sum())}"
        )
    empty = (lengths < 1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"document {empty[0]} has no token ({len(empty)} such documents: {empty[:10]})")
    query_tokens, owner = _real_query_tokens(queries, query_mask, compute_dtype or queries.dtype)  # [Tq, D], [Tq]
    document_of_row = torch.repeat_interleave(torch.arange(len(lengths)), lengths.cpu()).to(tokens.device)  # [T]
    starts = (torch.cumsum(lengths, 0) - lengths).tolist()  # [Bd] first row of each document
    best = torch.empty(len(lengths), query_tokens.shape[0], dtype=query_tokens.dtype, device=tokens.device)  # [Bd, Tq]
    for start, stop in _packed_runs(lengths.tolist(), max(1, query_tokens.shape[0]), block_elements):
        first, end = starts[start], starts[stop - 1] + int(lengths[stop - 1])
        similarity = tokens[first:end].to(query_tokens.dtype) @ query_tokens.T  # [run tokens, Tq]
        # Every row of the run goes to its document's slot, keeping the largest: a segment maximum.
        slots = (document_of_row[first:end] - start).unsqueeze(1).expand_as(similarity)  # [run tokens, Tq]
        best[start:stop] = similarity.new_full((stop - start, similarity.shape[1]), -torch.inf).scatter_reduce_(
            0, slots, similarity, "amax"
        )
    return _sum_per_query(best, owner, queries.shape[0], queries.dtype)  # [Bq, Bd]


__all__ = ["DEFAULT_BLOCK_ELEMENTS", "check_token_matrices", "maxsim", "maxsim_packed"]
