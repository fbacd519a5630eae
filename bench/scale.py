"""Scale-out of corpus encoding: the local single-process path against Ray with 1 and with 2 workers.

The same corpus (texts, drawn images and image+text lines) is embedded by `unime encode` three times into fresh
embedding stores, on the small (compute-bound) Qwen2-VL: here in one process with one torch thread, then on a
local Ray cluster (started once, before the timings) with 1 and 2 actors of one CPU each (Ray sets each actor's
OMP_NUM_THREADS to 1). Each time covers the whole command: reading the corpus, loading the model (in every
actor too) and writing the store. The vectors of the three runs are compared, and the ratios printed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale.py [--items 4000] [--batch-size 16] [--ray-batch-size 32]

Two-rank ZeRO-3 memory, the other figure of the scale-out benchmark, is measured by `bench/zero_memory.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def write_corpus(path: Path, count: int, seed: int = 0) -> None:
    """`count` JSONL lines: captions of 10..60 words, drawn scenes of 64..160 px, and both, in turn."""
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    rng = random.Random(seed)
    lines = []
    for number in range(count):
        scene = random_scene(rng)
        caption = describe(scene)
        words = ((caption + " ") * 8).split()[: rng.randint(10, 60)]
        if number % 3 == 0:
            lines.append({"text": f"{number}: " + " ".join(words)})
            continue
        name = f"scene-{number}.png"
        draw_scene(scene, size=rng.randint(64, 160)).save(path.parent / name)
        lines.append({"image": name, **({"text": caption} if number % 3 == 2 else {})})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass")
    parser.add_argument("--ray-batch-size", type=int, default=32, help="records per block sent to an actor")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from unime.data_synth.encode import EncodeSettings, encode_corpus
    from unime.ray_engine import RaySettings
    from unime.tiny import save_tiny

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        model = save_tiny("qwen2_vl", root / "model", size="small")
        corpus = root / "corpus.jsonl"
        write_corpus(corpus, args.items)

        def run(name: str, **engine) -> tuple[float, np.ndarray]:
            """Seconds of one whole `unime encode`, and its vectors in corpus order."""
            store_dir = root / name
            settings = EncodeSettings(
                corpus=str(corpus), store_dir=str(store_dir), model=str(model), batch_size=args.batch_size, **engine
            )
            started = time.perf_counter()
            done = encode_corpus(settings)
            seconds = time.perf_counter() - started
            # Lines with the same content share a key (and one vector), so a fresh store computes each key once.
            assert done.computed == len(set(done.keys)), (name, done.computed)
            return seconds, done.store.get(done.keys)  # [items, D]

        times, vectors = {}, {}
        times["local"], vectors["local"] = run("local")
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            for workers in (1, 2):
                name = f"ray, {workers} worker{'s' if workers > 1 else ''}"
                pool = RaySettings(num_workers=workers, batch_size=args.ray_batch_size)
                times[name], vectors[name] = run(f"ray-{workers}", engine="ray", ray=pool)
        finally:
            ray.shutdown()
        gaps = {name: float(np.abs(found - vectors["local"]).max()) for name, found in vectors.items()}

    print(
        f"{args.items} corpus lines (texts, images, image+text) on the small qwen2_vl, batch size {args.batch_size}, "
        f"Ray blocks of {args.ray_batch_size}, one thread per process, {os.cpu_count()} CPUs\n"
    )
    print(f"{'run':18s} {'seconds':>8s} {'lines/s':>8s} {'vs local':>9s} {'max |diff| vs local':>20s}")
    for name, seconds in times.items():
        ratio = times["local"] / seconds
        print(f"{name:18s} {seconds:8.1f} {args.items / seconds:8.1f} {ratio:8.2f}x {gaps[name]:20.2e}")
    print(
        f"\nRay, 2 workers vs 1: {times['ray, 1 worker'] / times['ray, 2 workers']:.2f}x speed-up; "
        f"Ray, 1 worker vs local: {times['ray, 1 worker'] / times['local']:.2f}x the time (its overhead)"
    )


if __name__ == "__main__":
    main()
