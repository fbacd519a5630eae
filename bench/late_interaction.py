"""Late-interaction benchmark: exact vectorised MaxSim scoring against a naive per-pair loop; encode throughput of
token matrices against single vectors on the same model; memory per page.

    OMP_NUM_THREADS=1 .venv/bin/python bench/late_interaction.py [--queries 32] [--documents 256] [--dim 128]
        [--device cpu|cuda]
        [--query-tokens 8 32] [--document-tokens 8 32 16 64 16 256 300 800] [--repeats 3] [--threads 1]
        [--pages 32] [--batch-size 8] [--model-size small] [--page-size 384 512] [--parts scoring encode]

Random L2-normalised token matrices (float32) with ragged lengths: queries of `--query-tokens` MIN MAX tokens, and
documents in each `--document-tokens` MIN MAX range given (short and long passages of text, then pages, whose image
patches give a ColQwen-style model several hundred tokens). Each setting is scored three ways in one run:
- naive: a Python loop over every (query, document) pair, each scored on its real tokens alone
  (`(q @ d.T).max(dim=1).values.sum()`, float32), the way a first implementation or a per-request scorer does it;
- float32: `unime.late_interaction.maxsim` on the padded batch with masks (one gather, matmul and max per chunk);
- bfloat16: the same with `compute_dtype=torch.bfloat16`, as colpali-engine scores its bf16 models.
The float32 ways give the same scores (checked); for bfloat16 the run prints its largest score error against the
naive loop and the share of each query's float32 top 10 it keeps (recall@10). Times are the best of `--repeats`, and
each ratio is against the naive loop of the same run.

All three do the same multiply-adds (the vectorised path multiplies only real query tokens and trims each chunk of
length-sorted documents to its longest), so once the matrices are large the naive loop is bound by arithmetic too
and the ratio falls towards the gain of one large matmul over many small ones; it is largest where per-pair
overhead dominates (short matrices, many pairs). bfloat16 gains where the matmul has bf16 units (AMX, a GPU).

Encode (`--parts encode`): `--pages` document pages drawn by `unime.data_synth.pages` (the generator's default size),
encoded by one qwen2_vl model (`--model-size`, built in code) with a multi-vector head of `--dim`, at the same batch
size, as single vectors (`encode(pages)`) and as token matrices (`encode(pages, output="multi_vector")`): pages/s of
each (best of `--repeats`) and their ratio. Both run the same backbone forward; the multi-vector path adds the
head's projection and normalisation of every token and hands back one matrix per page. Memory per page is what the
token matrices of those pages hold: mean kept tokens per page x dim x 4 bytes (float32) or 2 (float16), beside one
single vector.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import unime
from unime.config import MultiVectorConfig
from unime.data_synth.pages import PagesSynthConfig, draw_page, plan
from unime.late_interaction import maxsim


def ragged_tokens(count: int, lengths: tuple[int, int], dim: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`count` token matrices `[L_i, dim]`, L_i uniform in the closed range `lengths`, rows L2-normalised."""
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=generator).tolist()
    return [F.normalize(torch.randn(size, dim, generator=generator), dim=-1) for size in sizes]


def pad(matrices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged `[L_i, D]` matrices into `[N, max L, D]` with a `[N, max L]` mask of real tokens."""
    length = max(m.shape[0] for m in matrices)
    device = matrices[0].device
    tokens = torch.zeros(len(matrices), length, matrices[0].shape[1], device=device)  # [N, L, D]
    mask = torch.zeros(len(matrices), length, dtype=torch.bool, device=device)  # [N, L]
    for row, matrix in enumerate(matrices):
        tokens[row, : matrix.shape[0]] = matrix
        mask[row, : matrix.shape[0]] = True
    return tokens, mask


def naive_scores(queries: list[torch.Tensor], documents: list[torch.Tensor]) -> torch.Tensor:
    """MaxSim pair by pair: for each query, for each document, the best document token per query token, summed."""
    scores = torch.empty(len(queries), len(documents), device=queries[0].device)  # [Q, N]
    for a, query in enumerate(queries):
        for b, document in enumerate(documents):
            scores[a, b] = (query @ document.T).max(dim=1).values.sum()  # [Lq, Ld] -> scalar
    return scores


def best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """The fastest of `repeats` calls (after one warm-up call) and the last result; on a GPU each call is timed
    to the end of its kernels."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def recall_at(k: int, expected: torch.Tensor, got: torch.Tensor) -> float:
    """The share of each query's top `k` documents under `expected` that `got` keeps in its top `k`."""
    top_expected, top_got = expected.topk(k, dim=1).indices, got.topk(k, dim=1).indices  # [Q, k]
    kept = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_expected, top_got, strict=True))
    return kept / top_expected.numel()


def time_setting(queries: list[torch.Tensor], documents: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Seconds for the naive loop and for `maxsim` in float32 and in bfloat16 on the same queries and documents,
    after checking that float32 agrees with the loop; bfloat16's largest score error and recall@10."""
    query_tokens, query_mask = pad(queries)  # [Q, Lq, D], [Q, Lq]
    document_tokens, document_mask = pad(documents)  # [N, Ld, D], [N, Ld]

    def vectorised(dtype: torch.dtype | None) -> Callable[[], torch.Tensor]:
        return lambda: maxsim(query_tokens, query_mask, document_tokens, document_mask, compute_dtype=dtype)

    with torch.inference_mode():
        naive_s, expected = best_time(lambda: naive_scores(queries, documents), repeats)
        float32_s, got = best_time(vectorised(None), repeats)
        bfloat16_s, rounded = best_time(vectorised(torch.bfloat16), repeats)
    # The two float32 ways must agree before their times mean anything (summation order differs slightly).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    return {
        "naive": naive_s,
        "float32": float32_s,
        "bfloat16": bfloat16_s,
        "bfloat16_error": (rounded - expected).abs().max().item(),
        "bfloat16_recall": recall_at(10, expected, rounded),
    }


def bench_scoring(args: argparse.Namespace) -> None:
    ranges = [tuple(args.document_tokens[i : i + 2]) for i in range(0, len(args.document_tokens), 2)]
    print(
        f"MaxSim scoring: {args.queries} queries of {args.query_tokens[0]}-{args.query_tokens[1]} tokens x "
        f"{args.documents} documents, dim {args.dim}, float32 inputs, on {args.device} "
        f"({torch.get_num_threads()} CPU thread(s)), "
        f"best of {args.repeats}"
    )
    print(
        "| document tokens | pairs | naive pairs/s | naive GFLOP/s | float32 pairs/s | float32 GFLOP/s | float32 is | "
        "bfloat16 pairs/s | bfloat16 GFLOP/s | bfloat16 is | bfloat16 max error | bfloat16 recall@10 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for index, document_range in enumerate(ranges):
        generator = torch.Generator().manual_seed(index)
        queries = ragged_tokens(args.queries, tuple(args.query_tokens), args.dim, generator)
        documents = ragged_tokens(args.documents, document_range, args.dim, generator)
        queries, documents = [q.to(args.device) for q in queries], [d.to(args.device) for d in documents]
        times = time_setting(queries, documents, args.repeats)
        pairs = args.queries * args.documents
        # The arithmetic all must do: a multiply and an add per dimension for every real (query, document) token pair.
        gflop = 2 * args.dim * sum(len(q) for q in queries) * sum(len(d) for d in documents) / 1e9
        cells = [f"{document_range[0]}-{document_range[1]}", str(pairs)]
        for name in ("naive", "float32", "bfloat16"):
            cells += [f"{pairs / times[name]:,.0f}", f"{gflop / times[name]:.1f}"]
            if name != "naive":
                cells.append(f"**{times['naive'] / times[name]:.1f}x**")
        cells += [f"{times['bfloat16_error']:.4f}", f"{times['bfloat16_recall']:.3f}"]
        print("| " + " | ".join(cells) + " |")


def drawn_pages(count: int, width: int, height: int) -> list:
    """`count` distinct document pages (PIL images) from the procedural generator, seed 0."""
    queries = plan(PagesSynthConfig(train=0, held_out=count, negatives=1, seed=0, width=width, height=height))
    return [draw_page(query.page, width, height) for query in queries]


def bench_encode(args: argparse.Namespace) -> None:
    model = unime.build_tiny("qwen2_vl", size=args.model_size, multi_vector=MultiVectorConfig(dim=args.dim))
    pages = drawn_pages(args.pages, *args.page_size)
    items = [{"image": page} for page in pages]

    def single() -> object:
        return model.encode(items, batch_size=args.batch_size, show_progress_bar=False)  # [N, D]

    def multi() -> list:
        return model.encode(items, batch_size=args.batch_size, output="multi_vector", show_progress_bar=False)

    single_s, vectors = best_time(single, args.repeats)
    multi_s, matrices = best_time(multi, args.repeats)
    tokens = [len(m) for m in matrices]
    mean_tokens = sum(tokens) / len(tokens)
    print(
        f"\nEncode: {len(pages)} drawn pages of {args.page_size[0]}x{args.page_size[1]} px, qwen2_vl "
        f"size={args.model_size} with a multi-vector head (dim {args.dim}), batch size {args.batch_size}, "
        f"{torch.get_num_threads()} thread(s), best of {args.repeats}"
    )
    print("| output | pages/s | relative to single vector |")
    print("|---|---|---|")
    print(f"| single vector ({vectors.shape[1]} dims) | {len(pages) / single_s:.2f} | 1.00x |")
    print(f"| multi-vector (token matrices) | {len(pages) / multi_s:.2f} | **{single_s / multi_s:.2f}x** |")
    print(
        f"\nMemory per page: {mean_tokens:.1f} kept tokens per page on average (min {min(tokens)}, max {max(tokens)})"
    )
    print("| representation | bytes per page | relative to one float32 single vector |")
    print("|---|---|---|")
    single_bytes = vectors.shape[1] * 4
    print(f"| single vector, float32 ({vectors.shape[1]} dims) | {single_bytes:,} | 1x |")
    for name, width in (("float32", 4), ("float16", 2)):
        per_page = mean_tokens * args.dim * width
        print(f"| token matrix, {name} (dim {args.dim}) | {per_page:,.0f} | {per_page / single_bytes:.0f}x |")


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
    parser.add_argument("--device", default="cpu", help="where the scoring part runs (cuda on a GPU machine)")
    parser.add_argument("--pages", type=int, default=32, help="drawn pages to encode")
    parser.add_argument("--batch-size", type=int, default=8, help="pages per forward pass, the same for both outputs")
    parser.add_argument("--model-size", choices=["tiny", "small"], default="small", help="the qwen2_vl built in code")
    parser.add_argument("--page-size", type=int, nargs=2, default=[384, 512], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--parts", nargs="+", choices=["scoring", "encode"], default=["scoring", "encode"])
    args = parser.parse_args()
    if len(args.document_tokens) % 2:
        parser.error("--document-tokens takes MIN MAX pairs")
    torch.set_num_threads(args.threads)
    if "scoring" in args.parts:
        bench_scoring(args)
    if "encode" in args.parts:
        bench_encode(args)


if __name__ == "__main__":
    main()
