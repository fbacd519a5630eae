"""Top-K inner-product search over a corpus with faiss: exact (IndexFlatIP) or approximate (IVF) by size.

The IVF index's `nprobe` is not guessed: it is calibrated on a sample of the actual queries against exact
search, doubling until recall@K reaches `target_recall`, so the approximation is as good as asked on the data
at hand (and only as slow as it needs to be).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from unime.errors import ConfigError

SearchMethod = Literal["auto", "exact", "ivf"]

EXACT_BELOW = 50_000
"""Corpus size below which `method="auto"` searches exactly, without trying IVF. Measured with bench/mine.py
(1 thread, dim 256, top-50, calibrated to recall@50 >= 0.95): on topic-clustered vectors IVF needed 96 of 100
lists at 10k candidates and 48 of 223 at 50k (slower than exact search both times), and 4 of 316 at 100k
(12x faster search than brute force); on smooth-manifold vectors it needed a quarter of the lists at every size.
Above this size, auto calibrates IVF and still searches exactly if IVF would scan too much (MAX_SCAN_FRACTION)."""

CALIBRATION_QUERIES = 512
"""Queries searched both ways to calibrate `nprobe`."""
CALIBRATION_SLACK = 0.01
"""Calibrate to target_recall + this: the sample's recall estimates the full run's with some error."""
MAX_SCAN_FRACTION = 0.08
"""With method "auto", IVF is used only if its calibrated nprobe scans at most this fraction of the lists; else
exact search is faster. An IVF list scan costs several times a flat BLAS scan per vector (bench/mine.py: at 100k
candidates, nprobe 64 of 316 lists searched slower than exact search, 2 of 316 about 8x faster)."""


@dataclass
class SearchResult:
    """The top-K of each query, best first."""

    scores: np.ndarray
    """`[Q, k]` inner products (cosine for normalised vectors)."""
    indices: np.ndarray
    """`[Q, k]` corpus indices (int64)."""
    method: Literal["exact", "ivf"]
    nlist: int | None = None
    """IVF lists (None for exact search)."""
    nprobe: int | None = None
    """IVF lists searched per query, as calibrated."""
    calibrated_recall: float | None = None
    """recall@k of the IVF search on the calibration sample."""


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - the eval extra installs it
        raise ConfigError("hard-negative mining needs faiss: pip install 'unime[eval]' (faiss-cpu)") from err
    return faiss


def _as_float32(name: str, array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    if array.ndim != 2:
        raise ConfigError(f"{name}: expected a 2-d array [n, dim], got shape {array.shape}")
    return array


def exact_search(queries: np.ndarray, corpus: np.ndarray, k: int) -> SearchResult:
    """Exact top-k by inner product (faiss IndexFlatIP)."""
    faiss = _faiss()
    queries, corpus = _as_float32("queries", queries), _as_float32("corpus", corpus)
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    scores, indices = index.search(queries, min(k, len(corpus)))
    return SearchResult(scores, indices.astype(np.int64), "exact")


def default_nlist(corpus_size: int) -> int:
    """About sqrt(N) lists, with at least 40 training points per list. faiss suggests 4-16 sqrt(N) for corpora of
    millions; at the 10^4-10^6 of mining jobs, sqrt(N) trains in seconds and calibrated nprobe keeps recall."""
    return max(1, min(int(math.sqrt(corpus_size)), corpus_size // 40))


def build_ivf(corpus: np.ndarray, nlist: int | None = None, *, seed: int = 0):
    """An IVF (flat lists, inner product) index over `corpus`, trained with k-means on a sample."""
    faiss = _faiss()
    corpus = _as_float32("corpus", corpus)
    nlist = nlist or default_nlist(len(corpus))
    dim = corpus.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    # k-means on a sample: 40 points per list (faiss warns below 39) trains well at a fraction of the time.
    sample = corpus[rng.choice(len(corpus), size=min(len(corpus), 40 * nlist), replace=False)]
    index.cp.seed = seed
    index.train(sample)
    index.add(corpus)
    return index


# nprobe values tried in turn: finer than doubling, so calibration does not overshoot by up to 2x.
_NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def calibrate_nprobe(
    index, corpus: np.ndarray, queries: np.ndarray, k: int, *, target_recall: float = 0.95, seed: int = 0
) -> tuple[int, float]:
    """The smallest nprobe (of a fixed ladder) whose recall@k on a sample of `queries` reaches `target_recall`
    against exact search; sets it on `index`. Returns (nprobe, recall)."""
    rng = np.random.default_rng(seed)
    queries = _as_float32("queries", queries)
    probe = queries[rng.choice(len(queries), size=min(len(queries), CALIBRATION_QUERIES), replace=False)]
    truth = brute_force_top_k(probe, corpus, k)
    steps = [n for n in _NPROBE_STEPS if n < index.nlist] + [index.nlist]
    for nprobe in steps:
        index.nprobe = nprobe
        recall = recall_at_k(index.search(probe, k)[1], truth)
        if recall >= target_recall + CALIBRATION_SLACK:
            break
    return index.nprobe, recall


def ivf_search(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    *,
    nlist: int | None = None,
    target_recall: float = 0.95,
    seed: int = 0,
    max_scan_fraction: float | None = None,
) -> SearchResult:
    """Approximate top-k with an IVF index whose nprobe is calibrated to reach `target_recall` (recall@k).

    With `max_scan_fraction`, falls back to exact search when the calibrated nprobe would scan more of the
    lists than that (then IVF would be slower than exact search on this data).
    """
    queries, corpus = _as_float32("queries", queries), _as_float32("corpus", corpus)
    k = min(k, len(corpus))
    index = build_ivf(corpus, nlist, seed=seed)
    nprobe, recall = calibrate_nprobe(index, corpus, queries, k, target_recall=target_recall, seed=seed)
    if max_scan_fraction is not None and nprobe > max_scan_fraction * index.nlist:
        return exact_search(queries, corpus, k)
    scores, indices = index.search(queries, k)
    return SearchResult(scores, indices.astype(np.int64), "ivf", index.nlist, nprobe, recall)


def brute_force_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """Exact top-k indices `[Q, k]` by a torch matmul over corpus chunks. For few queries: faiss' flat search
    skips BLAS below a large batch and was 10x slower here for a few hundred queries."""
    import torch

    q = torch.from_numpy(_as_float32("queries", queries))  # [Q, D]
    c = torch.from_numpy(_as_float32("corpus", corpus))  # [C, D]
    k = min(k, len(c))
    best_scores = torch.full((len(q), 0), float("-inf"))
    best_indices = torch.zeros((len(q), 0), dtype=torch.long)
    for start in range(0, len(c), chunk):
        scores = q @ c[start : start + chunk].T  # [Q, chunk]
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top.values], dim=1)  # [Q, <= 2k]
        merged_indices = torch.cat([best_indices, top.indices + start], dim=1)
        keep = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1).indices
        best_scores, best_indices = merged_scores.gather(1, keep), merged_indices.gather(1, keep)
    return best_indices.numpy()


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (both `[Q, k]` index arrays; -1 entries ignored)."""
    hits = 0
    total = 0
    for got, want in zip(found, truth, strict=True):
        want_set = {int(i) for i in want if i >= 0}
        hits += len(want_set & {int(i) for i in got if i >= 0})
        total += len(want_set)
    return hits / total if total else 1.0


def search(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    method: SearchMethod = "auto",
    *,
    target_recall: float = 0.95,
    seed: int = 0,
) -> SearchResult:
    """Top-k of each query among the corpus: exact below `EXACT_BELOW` candidates (or when asked), IVF above."""
    if k < 1:
        raise ConfigError(f"top-k must be >= 1, got {k}")
    if len(corpus) == 0:
        raise ConfigError("the corpus to search is empty")
    if method not in ("auto", "exact", "ivf"):
        raise ConfigError(f"search method must be 'auto', 'exact' or 'ivf', got {method!r}")
    if method == "exact" or (method == "auto" and len(corpus) < EXACT_BELOW):
        return exact_search(queries, corpus, k)
    fallback = MAX_SCAN_FRACTION if method == "auto" else None
    return ivf_search(queries, corpus, k, target_recall=target_recall, seed=seed, max_scan_fraction=fallback)
