"""The eval harness against the naive way on an MMEB-shaped benchmark: items encoded, wall time, same scores.

The benchmark is the synthetic one in MMEB's layout, with candidate repetition as in MMEB (classification
and VQA list the same labels for every query; retrieval and grounding draw `--candidates` candidates per query
from a pool of `--pool` scenes). Both methods run in one process on the same tiny model directory:
- harness: `unime.eval.mmeb.run_mmeb` (each distinct query and candidate encoded once, no disk cache);
- naive: every row's query and every listed candidate encoded (VLM2Vec's loop), then each row's argmax.
Scores must be identical (hit@1 per dataset; precision@1 is MMEB's metric).

    OMP_NUM_THREADS=1 .venv/bin/python bench/eval.py [--queries 40] [--candidates 40] [--pool 80] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def naive_hit_at_1(encoder, dataset, batch_size: int) -> tuple[float, int]:
    """Encode every listed query and candidate (repeats included), take each row's argmax; (hit@1, items encoded)."""
    listed = []
    for query_row, candidate_list in zip(dataset.query_rows, dataset.lists, strict=True):
        listed.append(dataset.queries.items[query_row])
        listed += [dataset.candidates.items[c] for c in candidate_list]
    vectors = encoder.encode(listed, batch_size=batch_size)  # [items listed, D]
    hits, offset = [], 0
    for candidate_list in dataset.lists:
        query = vectors[offset]
        candidates = vectors[offset + 1 : offset + 1 + len(candidate_list)]
        hits.append(int(np.argmax(candidates @ query)) == 0)
        offset += 1 + len(candidate_list)
    return float(np.mean(hits)), len(listed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=40, help="queries per dataset")
    parser.add_argument("--candidates", type=int, default=40, help="candidates per retrieval/grounding query")
    parser.add_argument("--pool", type=int, default=80, help="scenes retrieval/grounding candidates come from")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="qwen2_vl")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from unime.eval.encoders import UnimeEncoder
    from unime.eval.mmeb import list_datasets, load_dataset, run_mmeb
    from unime.eval.synthetic import write_synthetic_benchmark
    from unime.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_benchmark(
            Path(tmp) / "bench", queries=args.queries, candidates=args.candidates, pool=args.pool
        )
        encoder = UnimeEncoder(save_tiny(args.backbone, Path(tmp) / "model"))
        encoder.encode(
            [dataset_item for dataset_item in load_dataset(root, "Synthetic-VQA").queries.items[:4]]
        )  # warm-up

        started = time.perf_counter()
        results, stats = run_mmeb(encoder, root, batch_size=args.batch_size, progress=False)
        harness_seconds = time.perf_counter() - started
        harness_hits = {row["dataset"]: row["scores"]["hit@1"] for row in results["datasets"]}

        started = time.perf_counter()
        naive_hits, naive_items = {}, 0
        for name in list_datasets(root):
            naive_hits[name], encoded = naive_hit_at_1(encoder, load_dataset(root, name), args.batch_size)
            naive_items += encoded
        naive_seconds = time.perf_counter() - started

    print(
        f"MMEB-shaped synthetic benchmark: {len(harness_hits)} datasets x {args.queries} queries, "
        f"{args.candidates} candidates per retrieval/grounding query from a pool of {args.pool} "
        f"({os.cpu_count()} CPUs, {args.threads} torch thread(s), batch {args.batch_size})"
    )
    print(f"{'dataset':22s} {'harness hit@1':>14s} {'naive hit@1':>12s}")
    for name in harness_hits:
        print(f"{name:22s} {harness_hits[name]:14.4f} {naive_hits[name]:12.4f}")
    identical = harness_hits == naive_hits
    print(f"scores identical: {identical}")
    print(f"items encoded: harness {stats.encoded}, naive {naive_items}  -> {naive_items / stats.encoded:.2f}x fewer")
    print(
        f"wall time:     harness {harness_seconds:.1f} s, naive {naive_seconds:.1f} s  -> "
        f"{naive_seconds / harness_seconds:.2f}x faster"
    )
    if not identical:
        raise SystemExit("the harness and the naive way disagree")


if __name__ == "__main__":
    main()
