"""Encode throughput: unime's batched `encode` against a naive one-at-a-time loop and sentence-transformers.

All three run in one process, on the same tiny model directory and the same mixed list of texts, images and
text+image pairs of varied length and size, so the ratios hold even on a noisy machine. Each method is
timed `--repeats` times and its best run is kept.

    .venv/bin/python bench/encode.py [--items 192] [--batch-size 32] [--backbone qwen2_vl] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable

import numpy as np


def mixed_items(count: int, seed: int = 0) -> list:
    """Texts of 3..60 words, drawn scenes of 40..224 px, and text+image pairs, shuffled."""
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    rng = random.Random(seed)
    items: list = []
    for index in range(count):
        scene = random_scene(rng)
        caption = describe(scene)
        kind = index % 3
        if kind == 0:
            words = (caption + " ") * rng.randint(1, 6)
            items.append(" ".join(words.split()[: rng.randint(3, 60)]))
        else:
            size = rng.randint(40, 224)
            image = draw_scene(scene, size=size)
            items.append(image if kind == 1 else {"text": caption, "image": image})
    rng.shuffle(items)
    return items


def best_rate(run: Callable[[], object], count: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return count / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="qwen2_vl")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the stable setting here)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    import unime

    torch.set_num_threads(args.threads)
    items = mixed_items(args.items)
    with tempfile.TemporaryDirectory() as directory:
        unime.build_tiny(args.backbone).save(directory)
        embedder = unime.load(directory)
        st_model = SentenceTransformer(directory)

        methods: dict[str, Callable[[], np.ndarray]] = {
            "naive loop (one item per call)": lambda: np.stack([embedder.encode(item) for item in items]),
            "sentence-transformers encode": lambda: st_model.encode(items, batch_size=args.batch_size),
            "unime encode": lambda: embedder.encode(items, batch_size=args.batch_size),
        }
        outputs = {name: run() for name, run in methods.items()}  # warm-up, and the vectors to compare
        rates = {name: best_rate(run, len(items), args.repeats) for name, run in methods.items()}

    reference = outputs["unime encode"]
    print(
        f"{len(items)} mixed items (texts, images, text+image), tiny {args.backbone}, batch size "
        f"{args.batch_size}, {args.threads} torch thread(s), best of {args.repeats}\n"
    )
    print(f"{'method':34s} {'items/s':>9s} {'unime is':>10s} {'min cosine vs unime':>20s}")
    for name, rate in rates.items():
        cosine = float((outputs[name] * reference).sum(1).min())
        print(f"{name:34s} {rate:9.1f} {rates['unime encode'] / rate:9.2f}x {cosine:20.6f}")


if __name__ == "__main__":
    main()
