"""Mining search speed: faiss (exact IndexFlatIP and a calibrated IVF index) against a brute-force torch matmul.

All run in one process on the same vectors, so the ratios hold on a noisy machine. The vectors stand in for
embeddings, in two kinds (`--data`): topic-clustered vectors, where IVF does well, and vectors on a smooth
low-dimensional manifold, where it does badly (see `topic_vectors` and `manifold_vectors`); each query is a
perturbed corpus vector, as a query lies near its positive. Every method searches the same queries for their
top-K; IVF is timed with its training, adding and nprobe calibration (mining builds one index per job), and its
recall@K is measured against the exact top-K. Exact search's and brute force's top-K agree (printed).

    .venv/bin/python bench/mine.py [--sizes 10000 100000] [--queries 5000] [--dim 256] [--top-k 50]
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
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1 is stable here)")
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=["topics", "manifold"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import faiss

    from unime.data_synth.mining.search import build_ivf, calibrate_nprobe, exact_search, recall_at_k

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    print(f"dim {args.dim}, top-{args.top_k}, {args.queries} queries, {args.threads} thread(s)")
    header = (
        f"{'data':>8} {'corpus':>8} {'torch q/s':>10} {'exact q/s':>10} {'ivf q/s':>10} {'exact/torch':>12} "
        f"{'ivf/torch':>10} {'ivf/exact':>10} {'ivf search/torch':>13} {'recall@K':>9} {'nlist':>6} {'nprobe':>6}"
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
        (_, ivf_indices), search_s = timed(lambda i=index, q=queries: i.search(q, args.top_k))
        ivf_s = build_s + calibrate_s + search_s
        agreement = recall_at_k(brute, exact.indices)
        recall = recall_at_k(ivf_indices, exact.indices)
        rates = [args.queries / s for s in (torch_s, exact_s, ivf_s, search_s)]
        print(
            f"{data:>8} {size:>8} {rates[0]:>10.0f} {rates[1]:>10.0f} {rates[2]:>10.0f} {rates[1] / rates[0]:>11.2f}x "
            f"{rates[2] / rates[0]:>9.2f}x {rates[2] / rates[1]:>9.2f}x {rates[3] / rates[0]:>12.2f}x {recall:>9.3f} "
            f"{index.nlist:>6} {nprobe:>6}   (IVF build {build_s:.1f}s, calibrate {calibrate_s:.1f}s, search "
            f"{search_s:.1f}s; torch vs exact top-K overlap {agreement:.4f})"
        )


if __name__ == "__main__":
    main()
