"""Late-interaction benchmark: exact vectorised MaxSim scoring against a naive per-pair loop.

    OMP_NUM_THREADS=1 .venv/bin/python bench/late_interaction.py [--queries 32] [--documents 256] [--dim 128]
        [--query-tokens 8 32] [--document-tokens 8 32 16 64 16 256 300 800] [--repeats 3] [--threads 1]

Random L2-normalised token matrices (float32) with ragged lengths: queries of `--query-tokens` MIN MAX tokens, and
documents in each `--document-tokens` MIN MAX range given (short and long passages of text, then pages, whose image
patches give a ColQwen-style model several hundred tokens). Each setting is scored twice in one run:
- naive: a Python loop over every (query, document) pair, each scored on its real tokens alone
  (`(q @ d.T).max(dim=1).values.sum()`), the way a first implementation or a per-request scorer does it;
- vectorised: `unime.late_interaction.maxsim` on the padded batch with masks (one matmul per chunk).
Both give the same scores (checked); the time is the best of `--repeats`, and the ratio is between the two.

Both do the same multiply-adds (the vectorised path multiplies only real query tokens and trims each chunk of
length-sorted documents to its longest), so once the matrices are large the naive loop is bound by arithmetic too
and the ratio falls towards the gain of one large matmul over many small ones; it is largest where per-pair
overhead dominates (short matrices, many pairs).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from unime.late_interaction import maxsim


def ragged_tokens(count: int, lengths: tuple[int, int], dim: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`count` token matrices `[L_i, dim]`, L_i uniform in the closed range `lengths`, rows L2-normalised."""
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=generator).tolist()
    return [F.normalize(torch.randn(size, dim, generator=generator), dim=-1) for size in sizes]


def pad(matrices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged `[L_i, D]` matrices into `[N, max L, D]` with a `[N, max L]` mask of real tokens."""
    length = max(m.shape[0] for m in matrices)
    tokens = torch.zeros(len(matrices), length, matrices[0].shape[1])  # [N, L, D]
    mask = torch.zeros(len(matrices), length, dtype=torch.bool)  # [N, L]
    for row, matrix in enumerate(matrices):
        tokens[row, : matrix.shape[0]] = matrix
        mask[row, : matrix.shape[0]] = True
    return tokens, mask


def naive_scores(queries: list[torch.Tensor], documents: list[torch.Tensor]) -> torch.Tensor:
    """MaxSim pair by pair: for each query, for each document, the best document token per query token, summed."""
    scores = torch.empty(len(queries), len(documents))  # [Q, N]
    for a, query in enumerate(queries):
        for b, document in enumerate(documents):
            scores[a, b] = (query @ document.T).max(dim=1).values.sum()  # [Lq, Ld] -> scalar
    return scores


def best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """The fastest of `repeats` calls (after one warm-up call) and the last result."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def time_setting(queries: list[torch.Tensor], documents: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """Seconds for the naive loop and for `maxsim` on the same queries and documents, after checking they agree."""
    query_tokens, query_mask = pad(queries)  # [Q, Lq, D], [Q, Lq]
    document_tokens, document_mask = pad(documents)  # [N, Ld, D], [N, Ld]
    with torch.inference_mode():
        naive_s, expected = best_time(lambda: naive_scores(queries, documents), repeats)
        fast_s, got = best_time(lambda: maxsim(query_tokens, query_mask, document_tokens, document_mask), repeats)
    # The two must agree before their times mean anything (float32: summation order differs slightly).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    return naive_s, fast_s


def bench_scoring(args: argparse.Namespace) -> None:
    ranges = [tuple(args.document_tokens[i : i + 2]) for i in range(0, len(args.document_tokens), 2)]
    print(
        f"MaxSim scoring: {args.queries} queries of {args.query_tokens[0]}-{args.query_tokens[1]} tokens x "
        f"{args.documents} documents, dim {args.dim}, float32, {torch.get_num_threads()} thread(s), "
        f"best of {args.repeats}"
    )
    print(
        "| document tokens | pairs | naive s | naive pairs/s | naive GFLOP/s | vectorised s | vectorised pairs/s | "
        "vectorised GFLOP/s | vectorised is |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for index, document_range in enumerate(ranges):
        generator = torch.Generator().manual_seed(index)
        queries = ragged_tokens(args.queries, tuple(args.query_tokens), args.dim, generator)
        documents = ragged_tokens(args.documents, document_range, args.dim, generator)
        naive_s, fast_s = time_setting(queries, documents, args.repeats)
        pairs = args.queries * args.documents
        # The arithmetic both must do: a multiply and an add per dimension for every real (query, document) token pair.
        gflop = 2 * args.dim * sum(len(q) for q in queries) * sum(len(d) for d in documents) / 1e9
        print(
            f"| {document_range[0]}-{document_range[1]} | {pairs} | {naive_s:.3f} | {pairs / naive_s:,.0f} | "
            f"{gflop / naive_s:.1f} | {fast_s:.4f} | {pairs / fast_s:,.0f} | {gflop / fast_s:.1f} | "
            f"**{naive_s / fast_s:.1f}x** |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--documents", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128, help="token vector size (ColQwen: 128)")
    parser.add_argument("--query-tokens", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"))
    parser.add_argument(
        "--document-tokens",
        type=int,
        nargs="+",
        default=[8, 32, 16, 64, 16, 256, 300, 800],
        help="one or more MIN MAX pairs of document lengths, one setting each",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if len(args.document_tokens) % 2:
        parser.error("--document-tokens takes MIN MAX pairs")
    torch.set_num_threads(args.threads)
    bench_scoring(args)


if __name__ == "__main__":
    main()
