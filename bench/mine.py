"""Mining search speed: faiss (exact IndexFlatIP and a calibrated IVF index) against a brute-force torch matmul.

All run in one process on the same vectors, so the ratios hold on a noisy machine. The vectors stand in for
embeddings, in two kinds (`--data`): topic-clustered vectors, where IVF does well, and vectors on a smooth
low-dimensional manifold, where it does badly (see `topic_vectors` and `manifold_vectors`); each query is a
perturbed corpus vector, as a query lies near its positive. Every method searches the same queries for their
top-K; IVF is timed with its training, adding and nprobe calibration (mining builds one index per job), and its
recall@K is measured against the exact top-K. Exact search's and brute force's top-K agree (printed). "auto" is
what `unime mine` does: exact below EXACT_BELOW candidates; above, IVF if its calibrated nprobe scans at most
MAX_SCAN_FRACTION of the lists, else exact search after all (calibration time included).

    .venv/bin/python bench/mine.py [--sizes 10000 100000] [--queries 20000] [--dim 256] [--top-k 50]
        [--threads 1] [--data topics manifold]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def topic_vectors(count: int, dim: int, rng: np.random.Generator, topics: int = 1000) -> np.ndarray:
    """Unit vectors around `topics` random centres (cosine ~0.55 within a topic, ~0 across): a corpus whose
    neighbourhoods follow its topics, as embeddings of real collections do, where IVF cells fit well."""
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    noise = 0.9 * rng.standard_normal((count, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, topics, size=count)] + noise
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def manifold_vectors(count: int, dim: int, rng: np.random.Generator, intrinsic_dim: int = 24) -> np.ndarray:
    """Unit vectors on a curved manifold of intrinsic dimension 24, with no topic structure: similarity falls
    off smoothly, so the top-K spreads over many IVF cells. A hard case for IVF (uniform random vectors,
    intrinsic dimension = dim, are the worst and unlike any embedding model's output)."""
    latent = rng.standard_normal((count, intrinsic_dim)).astype(np.float32)
    lift = rng.standard_normal((intrinsic_dim, dim)).astype(np.float32) / np.sqrt(intrinsic_dim)
    # tanh bends the linear map, so the manifold is not a flat subspace.
    vectors = np.tanh(latent @ lift) + 0.1 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


DATA = {"topics": topic_vectors, "manifold": manifold_vectors}


def torch_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Brute force: scores of a chunk of queries against the whole corpus, then torch.topk."""
    q = torch.from_numpy(queries)  # [Q, D]
    c = torch.from_numpy(corpus)  # [C, D]
    out = []
    for start in range(0, len(q), chunk):
        scores = q[start : start + chunk] @ c.T  # [chunk, C]
        out.append(torch.topk(scores, k, dim=1).indices)  # [chunk, k]
    return torch.cat(out).numpy()


def timed(run):
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="corpus sizes")
    parser.add_argument("--queries", type=int, default=20_000, help="mining has about one query per candidate")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1 is stable here)")
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=["topics", "manifold"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--always-ivf", action="store_true", help="search with IVF even where auto would not")
    args = parser.parse_args(argv)

    import faiss

    from unime.data_synth.mining.search import (
        EXACT_BELOW,
        MAX_SCAN_FRACTION,
        build_ivf,
        calibrate_nprobe,
        exact_search,
        recall_at_k,
    )

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    print(f"dim {args.dim}, top-{args.top_k}, {args.queries} queries, {args.threads} thread(s)")
    header = (
        f"{'data':>8} {'corpus':>7} {'torch q/s':>9} {'exact q/s':>9} {'ivf q/s':>8} {'auto q/s':>8} "
        f"{'exact/torch':>11} {'ivf/torch':>9} {'auto/torch':>10} {'ivf search/torch':>16} {'recall@K':>8} "
        f"{'nlist':>5} {'nprobe':>6}"
    )
    print(header)
    for data, size in [(data, size) for data in args.data for size in args.sizes]:
        corpus = DATA[data](size, args.dim, rng)
        picks = rng.integers(0, size, size=args.queries)
        queries = corpus[picks] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)

        brute, torch_s = timed(lambda q=queries, c=corpus: torch_top_k(q, c, args.top_k))
        exact, exact_s = timed(lambda q=queries, c=corpus: exact_search(q, c, args.top_k))
        index, build_s = timed(lambda c=corpus: build_ivf(c, seed=args.seed))
        (nprobe, _), calibrate_s = timed(
            lambda i=index, q=queries, c=corpus: calibrate_nprobe(i, c, q, args.top_k, seed=args.seed)
        )
        ivf_pays = nprobe <= MAX_SCAN_FRACTION * index.nlist
        # IVF is searched in full only where mining's "auto" would use it: elsewhere it scans most lists, one
        # query at a time, and is many times slower than exact search (see MAX_SCAN_FRACTION).
        if ivf_pays or args.always_ivf:
            (_, ivf_indices), search_s = timed(lambda i=index, q=queries: i.search(q, args.top_k))
            recall = f"{recall_at_k(ivf_indices, exact.indices):.3f}"
        else:
            search_s, recall = float("nan"), "-"
        ivf_s = build_s + calibrate_s + search_s
        if size < EXACT_BELOW:
            auto_s = exact_s
        else:
            auto_s = build_s + calibrate_s + (search_s if ivf_pays else exact_s)
        agreement = recall_at_k(brute, exact.indices)
        torch_rate, exact_rate, ivf_rate, auto_rate, search_rate = (
            args.queries / s for s in (torch_s, exact_s, ivf_s, auto_s, search_s)
        )

        def rate(value: float, width: int) -> str:
            return f"{'-':>{width}}" if np.isnan(value) else f"{value:>{width}.0f}"

        def ratio(value: float, width: int) -> str:
            return f"{'-':>{width + 1}}" if np.isnan(value) else f"{value:>{width}.2f}x"

        searched = "not searched" if np.isnan(search_s) else f"search {search_s:.1f}s"
        print(
            f"{data:>8} {size:>7} {rate(torch_rate, 9)} {rate(exact_rate, 9)} {rate(ivf_rate, 8)} "
            f"{rate(auto_rate, 8)} {ratio(exact_rate / torch_rate, 10)} {ratio(ivf_rate / torch_rate, 8)} "
            f"{ratio(auto_rate / torch_rate, 9)} {ratio(search_rate / torch_rate, 15)} {recall:>8} {index.nlist:>5} "
            f"{nprobe:>6}   (IVF build {build_s:.1f}s, calibrate {calibrate_s:.1f}s, {searched}; auto uses "
            f"{'exact' if size < EXACT_BELOW or not ivf_pays else 'ivf'}; torch vs exact top-K overlap {agreement:.4f})"
        )


if __name__ == "__main__":
    main()
