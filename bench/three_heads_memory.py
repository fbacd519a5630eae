"""Memory of one checkpoint with three heads against three single-purpose models loaded from the same weights.

A small Qwen2-VL (`unime.build_tiny(size="small")`, compute-bound like a real model) gets a multi-vector head and
becomes a multi-task model, saved once. Each measurement runs in a fresh process, which loads:

- `one`: `unime.load(dir)`, the multi-task model (pooled vector, multi-vector head and reranker on one base);
- `three`: the pooled-vector embedder, the multi-vector embedder and the reranker, each `unime.load`ed on its own
  (`kind="embedder"` twice, `dir/reranker`), as a deployment of three models holds them.

    OMP_NUM_THREADS=1 .venv/bin/python bench/three_heads_memory.py

Printed per case: parameter bytes held (distinct storages, exact) and the growth of the resident set from after
the imports to after the loads (psutil; the peak mark is useless here, as the imports set it higher than a small
model's load), then the ratio three / one of each. One invocation, one
machine: the ratios are what to read.

Measured here (CPU, one thread; 61 MiB of weights): parameters 61.1 MiB against 182.9 MiB (2.99x); resident set
growth 296.5 MiB against 310.2 MiB (1.05x). The parameter bytes are what a GPU holds (each load copies its weights
to the device). On a CPU the resident set barely moves: transformers maps the safetensors file, and three loads of
one file share its pages, while the imports of the model classes and processors dominate the growth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(directory: str, case: str) -> dict[str, float]:
    import psutil
    import torch

    import unime
    from unime.multi_task import RERANKER_FOLDER

    torch.set_num_threads(1)
    start = psutil.Process().memory_info().rss
    if case == "one":
        models = [unime.load(directory)]
    else:
        pooled = unime.load(directory, kind="embedder")
        pooled.set_multi_vector_head(None)
        models = [pooled, unime.load(directory, kind="embedder"), unime.load(Path(directory) / RERANKER_FOLDER)]
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}
    held = psutil.Process().memory_info().rss
    return {"parameter_bytes": sum(storages.values()), "rss_growth_bytes": held - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("DIR", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return

    import unime
    from unime.config import MultiVectorConfig
    from unime.multi_task import from_embedder

    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "three-heads"
        embedder = unime.build_tiny("qwen2_vl", size="small", multi_vector=MultiVectorConfig(dim=128))
        from_embedder(embedder).save(directory)
        results = {}
        for case in ("one", "three"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(directory), case], capture_output=True, text=True, check=True
            )
            results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    for case, values in results.items():
        print(
            f"{case:>5}: parameters {values['parameter_bytes'] / 2**20:8.1f} MiB, "
            f"RSS growth {values['rss_growth_bytes'] / 2**20:8.1f} MiB"
        )
    for key in ("parameter_bytes", "rss_growth_bytes"):
        print(f"three / one, {key}: {results['three'][key] / results['one'][key]:.2f}")


if __name__ == "__main__":
    main()
