"""Multi-vector index benchmark: search against exact MaxSim over the whole corpus, and what token pooling costs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/late_interaction_index.py [--pages 100000] [--dim 128]
        [--tokens 48 112] [--topics 2000] [--queries 100] [--query-tokens 20] [--pool-factor 2] [--nlist 2048]
        [--nprobe 16] [--token-k 512] [--candidates 512] [--quality-query-tokens 3]
        [--quality-noise 3.0] [--quality-queries 1000] [--directory DIR]
    OMP_NUM_THREADS=1 .venv/bin/python bench/late_interaction_index.py --drawn [--drawn-train-pages 64]
        [--drawn-pages 200] [--drawn-steps 60] [--pool-factor 2] [--seed 0]

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
page (also for `--quality-queries` harder queries of `--quality-query-tokens` tokens with `--quality-noise`, where
the relevant page is not always first, so that what pooling loses can show; many of them, as a loss of 2% is a
few queries in a hundred: the loss is given with its standard error over the paired queries),
and the bytes each index holds (token matrices + token index), with the ratio pooled/plain. With `--directory`,
indexes already built there are reopened (a build of pages already indexed computes nothing).

`--drawn`: the quality part on drawn pages, with a trained model instead of synthetic matrices. The drawn marker
pages of the late-interaction learning test (`unime.data_synth.marker_pages`: three small two-colour markers on grey
clutter, a query naming one marker's two colours) train a tiny Qwen2-VL with a multi-vector head (image tokens
only) through the one training loop (`unime.train.loop.train`, the `late_interaction_visdoc` recipe config,
`--drawn-steps` steps on `--drawn-train-pages` pages). Every image of `--drawn-pages` held-out rows (each page and
its three hard negatives: the asked marker recoloured, flipped, or its halves swapped with another marker's) is the
corpus, indexed by `unime.index_command.build_index` without pooling and with `--pool-factor`. The corpus queries
are asked as the training rows ask ("red and blue"), one per marker there can be (56); a page is relevant when it
shows that marker (read from its pixels). Reported: recall@10 of the exact ranking, nDCG@5 (exact and through the
index) of each index and the loss of pooling, and each held-out page ranked among its three hard negatives for its
own query (nDCG@5 and how often it comes first), from plain and pooled page matrices.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

import unime
from unime.data.dataset import load_examples
from unime.data_synth.marker_pages import CELL, GRID, MARKERS, write_marker_pages
from unime.embedding_store import content_key
from unime.index_command import IndexBuildSettings, build_index, encode_matrices, resolve
from unime.inputs import Input
from unime.multi_vector_index import (
    MultiVectorIndex,
    SearchParams,
    read_index_meta,
    synthetic_page,
    synthetic_query,
)
from unime.train.config import load_train_config
from unime.train.loop import train
from unime.train.model import load_for_training

ROOT = Path(__file__).resolve().parents[1]

DRAWN_CONFIG = ROOT / "recipes" / "configs" / "late_interaction_visdoc.yaml"


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
    parser.add_argument("--quality-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--directory", default=None, help="where to build the indexes (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--drawn", action="store_true", help="the quality part on drawn pages (see above)")
    parser.add_argument("--drawn-train-pages", type=int, default=64)
    parser.add_argument("--drawn-pages", type=int, default=200)
    parser.add_argument("--drawn-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
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
    return float(np.mean(ndcg_at_5_per_query(results, relevant)))


def ndcg_at_5_per_query(results, relevant: list[str]) -> np.ndarray:
    """`[Q]` nDCG@5 of each query's one relevant page."""
    gains = []
    for hits, page in zip(results, relevant, strict=True):
        ranks = [rank for rank, hit in enumerate(hits[:5]) if hit.id == page]
        gains.append(1.0 / np.log2(ranks[0] + 2) if ranks else 0.0)
    return np.array(gains)


def loss_with_error(pooled: np.ndarray, plain: np.ndarray) -> tuple[float, float]:
    """The relative nDCG@5 loss of pooling in percent, and its standard error over the (paired) queries."""
    differences = plain - pooled  # [Q]
    return (
        100 * differences.mean() / plain.mean(),
        100 * differences.std(ddof=1) / np.sqrt(len(differences)) / plain.mean(),
    )


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


def page_markers(path: str) -> frozenset[tuple[str, str]]:
    """The markers a drawn page shows, each as its (left half, right half) colours, read from its cells' pixels."""
    by_rgb = {value: name for name, value in MARKERS.items()}
    found = set()
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        for cell in range(GRID * GRID):
            left, middle = cell % GRID * CELL, cell // GRID * CELL + CELL // 2
            halves = (rgb.getpixel((left + CELL // 4, middle)), rgb.getpixel((left + 3 * CELL // 4, middle)))
            if halves[0] in by_rgb and halves[1] in by_rgb:
                found.add((by_rgb[halves[0]], by_rgb[halves[1]]))
    return frozenset(found)


def graded_ndcg_at_5(results, relevant: list[set[str]]) -> np.ndarray:
    """`[Q]` nDCG@5 with every relevant page of a query worth 1 (ideal: min(5, relevant) of them first)."""
    gains = []
    for hits, wanted in zip(results, relevant, strict=True):
        dcg = sum(1.0 / np.log2(rank + 2) for rank, hit in enumerate(hits[:5]) if hit.id in wanted)
        ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(5, len(wanted))))
        gains.append(dcg / ideal)
    return np.array(gains)


def drawn_quality(root: Path, args: argparse.Namespace) -> None:
    """Train a tiny multi-vector model on drawn marker pages, index held-out pages with and without pooling, and
    report what pooling costs on them (see the module docstring)."""
    train_file = write_marker_pages(root / "pages", "train", args.drawn_train_pages, seed=args.seed)
    held_out = write_marker_pages(root / "pages", "held_out", args.drawn_pages, seed=args.seed)
    config = load_train_config(
        DRAWN_CONFIG,
        [
            f"data.train_files=[{train_file}]",
            f"output_dir={root / 'model'}",
            f"seed={args.seed}",
            "log_with=[]",
            "save_every=0",
            f"optim.max_steps={args.drawn_steps}",
            "optim.warmup_steps=5",
            "model.multi_vector.tokens=image",
        ],
    )
    start = time.perf_counter()
    model_dir = train(config, load_for_training(config.model), load_examples([train_file])[0])
    print(
        f"trained {args.drawn_steps} steps on {args.drawn_train_pages} drawn pages "
        f"in {time.perf_counter() - start:.0f} s"
    )
    embedder = unime.load(model_dir)
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    images = [side["image"] for row in rows for side in (row["positive"], *row["negatives"])]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": Path(image).stem, "image": image}) + "\n" for image in images))
    markers = {Path(image).stem: page_markers(image) for image in images}
    asked = list(itertools.permutations(sorted(MARKERS), 2))  # every marker (left, right) there can be
    relevant = [{page for page, shown in markers.items() if marker in shown} for marker in asked]
    # Asked as the training rows ask for a marker.
    queries = [Input(text=f"{left} and {right}") for left, right in asked]
    matrices = encode_matrices(embedder, resolve(embedder, queries, "query"), batch_size=8)
    chance = float(np.mean([len(r) / len(images) for r in relevant]))
    print(
        f"{len(images)} held-out drawn pages ({args.drawn_pages} rows: page and 3 hard negatives), "
        f"{len(queries)} marker queries (relevant pages per query {min(map(len, relevant))}-"
        f"{max(map(len, relevant))}, nDCG@5 of a random ranking about {chance:.3f})"
    )
    results = {}
    for pool_factor in (1, args.pool_factor):
        settings = IndexBuildSettings(
            corpus=str(corpus),
            index_dir=str(root / f"drawn-index-{pool_factor}"),
            model=str(model_dir),
            pool_factor=pool_factor,
        )
        build_index(settings, embedder)
        index = MultiVectorIndex(
            settings.index_dir,
            model=str(model_dir),
            fingerprint=read_index_meta(Path(settings.index_dir))["fingerprint"],
            pool_factor=pool_factor,
        )
        exact, found = index.exact_search(matrices, args.k), index.search(matrices, SearchParams(k=args.k))
        stored = index.store.get_matrices(list(index.pages().values()))
        results[pool_factor] = {
            "tokens per page": float(np.mean([len(m) for m in stored])),
            "recall@10 (own exact)": recall(found, exact, args.k),
            "nDCG@5 exact": graded_ndcg_at_5(exact, relevant),  # [Q]
            "nDCG@5 index": graded_ndcg_at_5(found, relevant),  # [Q]
            "bytes": sum(index.memory_bytes().values()),
            "exact": exact,
            "index": index,
        }
    plain, pooled = results[1], results[args.pool_factor]
    for name, row in (("plain", plain), (f"pooled x{args.pool_factor}", pooled)):
        print(
            f"  {name}: {row['tokens per page']:.1f} tokens/page, recall@10 of its exact ranking "
            f"{row['recall@10 (own exact)']:.3f}, nDCG@5 exact {row['nDCG@5 exact'].mean():.4f}, index "
            f"{row['nDCG@5 index'].mean():.4f}, {row['bytes'] / 1e3:.0f} kB"
        )
    index_loss, index_error = loss_with_error(pooled["nDCG@5 index"], plain["nDCG@5 index"])
    exact_loss, exact_error = loss_with_error(pooled["nDCG@5 exact"], plain["nDCG@5 exact"])
    print(
        f"pooled/plain memory {pooled['bytes'] / plain['bytes']:.3f}; nDCG@5 loss from pooling: {index_loss:.2f}% "
        f"(standard error {index_error:.2f}) through the index, {exact_loss:.2f}% ({exact_error:.2f}) by exact "
        f"MaxSim; recall@10 of the plain exact ranking by the pooled exact one "
        f"{recall(pooled['exact'], plain['exact'], args.k):.3f}"
    )
    # The task the model was trained on: each held-out page against its three hard negatives, from the stored
    # (plain or pooled) matrices; nDCG@5 of the page among the four (chance 0.640), and how often it comes first.
    row_inputs = resolve(embedder, [Input(text=r["query"]["text"]) for r in rows], "query")
    row_queries = encode_matrices(embedder, row_inputs, batch_size=8)
    for result in results.values():
        keys = result["index"].pages()
        ranks = []
        for query, row in zip(row_queries, rows, strict=True):
            group = [keys[Path(side["image"]).stem] for side in (row["positive"], *row["negatives"])]
            scores = result["index"].exact_scores([query], group)[0]  # [4]
            ranks.append(int((scores[1:] >= scores[0]).sum()))
        result["group nDCG@5"] = np.array([1 / np.log2(rank + 2) for rank in ranks])  # [rows]
        result["accuracy"] = float(np.mean([rank == 0 for rank in ranks]))
    group_loss, group_error = loss_with_error(pooled["group nDCG@5"], plain["group nDCG@5"])
    print(
        f"each held-out page among its 3 hard negatives ({len(rows)} rows): nDCG@5 plain "
        f"{plain['group nDCG@5'].mean():.4f}, pooled {pooled['group nDCG@5'].mean():.4f} (loss {group_loss:.2f}%, "
        f"standard error {group_error:.2f}; chance 0.640); first of the four: plain {plain['accuracy']:.3f}, pooled "
        f"{pooled['accuracy']:.3f} (chance 0.25)"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    root = Path(args.directory or tempfile.mkdtemp(prefix="index-bench-"))
    if args.drawn:
        try:
            drawn_quality(root, args)
        finally:
            if args.directory is None:
                shutil.rmtree(root, ignore_errors=True)
        return
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
        hard_sources = rng.choice(args.pages, size=min(args.pages, args.quality_queries), replace=False)
        hard = [
            synthetic_query(
                synthetic_page(int(p), dim=args.dim, tokens=tuple(args.tokens), topics=args.topics),
                tokens=args.quality_query_tokens,
                seed=int(p),
                noise=args.quality_noise,
            )
            for p in hard_sources
        ]
        hard_relevant = [f"page-{p}" for p in hard_sources]
        hard_gains = {}
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
            hard_gains[name] = {
                "exact": ndcg_at_5_per_query(hard_exact, hard_relevant),
                "index": ndcg_at_5_per_query(hard_found, hard_relevant),
            }
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
                    f"nDCG@5 exact ({args.quality_query_tokens}-token queries)": hard_gains[name]["exact"].mean(),
                    f"nDCG@5 index ({args.quality_query_tokens}-token queries)": hard_gains[name]["index"].mean(),
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
        loss = 1 - rows[1]["nDCG@5 index"] / rows[0]["nDCG@5 index"]
        plain_gains, pooled_gains = hard_gains["plain"], hard_gains[f"pooled x{args.pool_factor}"]
        hard_loss, hard_error = loss_with_error(pooled_gains["index"], plain_gains["index"])
        exact_loss, exact_error = loss_with_error(pooled_gains["exact"], plain_gains["exact"])
        print(
            f"pooled/plain memory: {size[1] / size[0]:.3f}; nDCG@5 loss from pooling: {100 * loss:.2f}% "
            f"({args.query_tokens}-token queries), {hard_loss:.2f}% (standard error {hard_error:.2f}; "
            f"{exact_loss:.2f}% ({exact_error:.2f}) by exact MaxSim) on {len(hard)} {args.quality_query_tokens}-token "
            "queries"
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
