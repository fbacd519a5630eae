"""Multi-vector index benchmark: search against exact MaxSim over the whole corpus, and what token pooling costs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/late_interaction_index.py [--pages 100000] [--dim 128]
        [--tokens 48 112] [--topics 2000] [--queries 100] [--query-tokens 20] [--pool-factor 2] [--nlist 2048]
        [--nprobe 16] [--token-k 512] [--candidates 512] [--quality-query-tokens 3]
        [--quality-noise 3.0] [--directory DIR]

Pages are synthetic token matrices (`unime.multi_vector_index.synthetic_page`): `--tokens` MIN MAX unit vectors of
`--dim` per page, clustered like the patches of a real page (2-4 facets per page, each a noisy copy of one of
`--topics` shared topics, every token a noisy copy of a facet). Each query is a noisy copy of `--query-tokens`
tokens of one page drawn at random, that page being its one relevant page. Two indexes are built from the same
pages in one run, without pooling and with `--pool-factor`, into the embedding store (float16) with the token
index beside it, exactly as `unime index build` builds them. Then, for the same queries:
- exact: MaxSim of every query against every page (`MultiVectorIndex.exact_search`, all queries in one pass over
  the corpus, so the per-query time is the cheapest exact search there is);
- index: `MultiVectorIndex.search` (token candidates, then exact MaxSim on `--candidates` pages);
- summary vectors, the alternative candidate stage: each page's mean token (normalised), the `--candidates`
  nearest by inner product (a flat faiss search), then the same exact MaxSim.
Reported: seconds per query and the ratio exact/index, recall@10 of the exact top 10, nDCG@5 of the relevant
page (also for harder queries of `--quality-query-tokens` tokens with `--quality-noise`, where the relevant page is
not always first, so that what pooling loses can show),
and the bytes each index holds (token matrices + token index), with the ratio pooled/plain. With `--directory`,
indexes already built there are reopened (a build of pages already indexed computes nothing).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from unime.embedding_store import content_key
from unime.multi_vector_index import MultiVectorIndex, SearchParams, synthetic_page, synthetic_query


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, nargs=2, default=[48, 112], metavar=("MIN", "MAX"))
    parser.add_argument("--topics", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--query-tokens", type=int, default=20)
    parser.add_argument("--pool-factor", type=int, default=2)
    parser.add_argument("--nlist", type=int, default=2048)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--token-k", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=512)
    parser.add_argument("--quality-query-tokens", type=int, default=3)
    parser.add_argument("--quality-noise", type=float, default=3.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--directory", default=None, help="where to build the indexes (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def build(directory: Path, args: argparse.Namespace, pool_factor: int) -> tuple[MultiVectorIndex, float]:
    ids = [f"page-{i}" for i in range(args.pages)]
    keys = [content_key(text=page_id) for page_id in ids]
    index = MultiVectorIndex(
        directory, model="synthetic", fingerprint="0" * 64, pool_factor=pool_factor, nlist=args.nlist, shard_size=4096
    )

    def compute(positions: list[int]) -> list[np.ndarray]:
        return [synthetic_page(p, dim=args.dim, tokens=tuple(args.tokens), topics=args.topics) for p in positions]

    start = time.perf_counter()
    index.add(ids, keys, compute, batch_size=1024)
    return index, time.perf_counter() - start


def recall(found, exact, k: int) -> float:
    return float(
        np.mean([len({h.id for h in a[:k]} & {h.id for h in e[:k]}) / k for a, e in zip(found, exact, strict=True)])
    )


def ndcg_at_5(results, relevant: list[str]) -> float:
    gains = []
    for hits, page in zip(results, relevant, strict=True):
        ranks = [rank for rank, hit in enumerate(hits[:5]) if hit.id == page]
        gains.append(1.0 / np.log2(ranks[0] + 2) if ranks else 0.0)
    return float(np.mean(gains))


def summary_search(index: MultiVectorIndex, queries: list[np.ndarray], args: argparse.Namespace):
    """Candidates by per-page mean vectors, then exact MaxSim: (hits per query, seconds per query)."""
    keys, means = [], []
    for _, _, chunk_keys, tokens, offsets in index.store.matrix_shards():
        sums = np.add.reduceat(tokens.float().numpy(), offsets[:-1], axis=0)  # [n, D]
        means.append(sums / np.linalg.norm(sums, axis=1, keepdims=True))
        keys += chunk_keys
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(np.concatenate(means).astype(np.float32))
    start = time.perf_counter()
    found = []
    for query in queries:
        mean = query.sum(axis=0, keepdims=True)
        _, rows = flat.search(mean / np.linalg.norm(mean), args.candidates)  # [1, candidates]
        candidate_keys = [keys[r] for r in rows[0]]
        scores = index.exact_scores([query], candidate_keys)[0]  # [candidates]
        order = torch.argsort(scores, descending=True)[: args.k].tolist()
        found.append([candidate_keys[i] for i in order])
    return found, (time.perf_counter() - start) / len(queries)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    root = Path(args.directory or tempfile.mkdtemp(prefix="index-bench-"))
    print(
        f"{args.pages} synthetic pages of {args.tokens[0]}-{args.tokens[1]} tokens (dim {args.dim}, {args.topics} "
        f"topics), {args.queries} queries of {args.query_tokens} tokens; {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}"
    )
    try:
        plain, plain_build = build(root / "plain", args, 1)
        print(f"built (or reopened: --directory) the plain index in {plain_build:.0f} s (nlist {plain.nlist})")
        pooled, pooled_build = build(root / "pooled", args, args.pool_factor)
        print(f"built the pooled index (factor {args.pool_factor}) in {pooled_build:.0f} s")
        rng = np.random.default_rng(1)
        sources = rng.choice(args.pages, size=args.queries, replace=False)
        queries = [
            synthetic_query(
                synthetic_page(int(p), dim=args.dim, tokens=tuple(args.tokens), topics=args.topics),
                tokens=args.query_tokens,
                seed=int(p),
            )
            for p in sources
        ]
        relevant = [f"page-{p}" for p in sources]
        hard = [
            synthetic_query(
                synthetic_page(int(p), dim=args.dim, tokens=tuple(args.tokens), topics=args.topics),
                tokens=args.quality_query_tokens,
                seed=int(p),
                noise=args.quality_noise,
            )
            for p in sources
        ]
        params = SearchParams(k=args.k, nprobe=args.nprobe, token_k=args.token_k, candidates=args.candidates)
        rows = []
        exact_plain = None
        for name, index in (("plain", plain), (f"pooled x{args.pool_factor}", pooled)):
            index.search(queries[:2], params)  # opens the index (reads and merges its parts) before timing
            start = time.perf_counter()
            exact = index.exact_search(queries, args.k)
            exact_s = (time.perf_counter() - start) / len(queries)
            start = time.perf_counter()
            found = index.search(queries, params)
            search_s = (time.perf_counter() - start) / len(queries)
            exact_plain = exact_plain or exact
            memory = index.memory_bytes()
            hard_exact, hard_found = index.exact_search(hard, args.k), index.search(hard, params)
            rows.append(
                {
                    "index": name,
                    "exact s/query": exact_s,
                    "index s/query": search_s,
                    "speed-up": exact_s / search_s,
                    "recall@10 (own exact)": recall(found, exact, args.k),
                    "recall@10 (plain exact)": recall(found, exact_plain, args.k),
                    "nDCG@5 exact": ndcg_at_5(exact, relevant),
                    "nDCG@5 index": ndcg_at_5(found, relevant),
                    f"nDCG@5 exact ({args.quality_query_tokens}-token queries)": ndcg_at_5(hard_exact, relevant),
                    f"nDCG@5 index ({args.quality_query_tokens}-token queries)": ndcg_at_5(hard_found, relevant),
                    "tokens MB": memory["tokens"] / 1e6,
                    "token index MB": memory["token_index"] / 1e6,
                }
            )
        for row in rows:
            print(
                "  ".join(
                    f"{key}: {value:.4g}" if isinstance(value, float) else f"{value}" for key, value in row.items()
                )
            )
        size = [r["tokens MB"] + r["token index MB"] for r in rows]
        hard_key = f"nDCG@5 index ({args.quality_query_tokens}-token queries)"
        loss = 1 - rows[1]["nDCG@5 index"] / rows[0]["nDCG@5 index"]
        hard_loss = 1 - rows[1][hard_key] / rows[0][hard_key]
        print(
            f"pooled/plain memory: {size[1] / size[0]:.3f}; nDCG@5 loss from pooling: {100 * loss:.2f}% "
            f"({args.query_tokens}-token queries), {100 * hard_loss:.2f}% ({args.quality_query_tokens}-token queries)"
        )
        summary, summary_s = summary_search(plain, queries, args)
        key_of = plain.pages()
        summary_recall = float(
            np.mean(
                [len(set(s) & {key_of[h.id] for h in e}) / args.k for s, e in zip(summary, exact_plain, strict=True)]
            )
        )
        print(
            f"summary-vector candidates ({args.candidates} pages, then exact MaxSim): {summary_s:.4g} s/query, "
            f"recall@10 {summary_recall:.3f} (token candidates: {rows[0]['recall@10 (own exact)']:.3f})"
        )
    finally:
        if args.directory is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
