"""Attention kernels on batches of new shapes: torch's own SDPA choice against unime's, the model alone.

Torch tries cuDNN first for masked attention on Hopper and newer GPUs, and cuDNN builds an execution plan for
every new (batch, length) shape; unime's forward passes leave it out (`ATTENTION_BACKENDS`). Both run in one
process on the same tiny model, alternating, each on batches it has not seen (so every batch is a new shape,
as a server's merged requests are). On a CPU both pick the same kernels, so the ratio is about 1.

    python bench/attention.py [--model tiny|small] [--batches 5] [--batch-size 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from encode import mixed_items
from torch.nn.attention import SDPBackend

import unime
import unime.backbone_module as backbone_module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--batches", type=int, default=5, help="batches per variant and round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    variants = {
        "torch's choice (cuDNN allowed)": [b for name, b in SDPBackend.__members__.items() if name != "ERROR"],
        "unime's (cuDNN left out)": list(backbone_module.ATTENTION_BACKENDS),
    }
    per_slice = args.batches * args.batch_size
    items = mixed_items(per_slice * len(variants) * args.rounds + args.batch_size, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        model = unime.load(unime.save_tiny("qwen2_vl", Path(tmp) / "model", size=args.model))
        model.encode(items[: args.batch_size], batch_size=args.batch_size)  # warm-up: first-call costs out
        print(f"{args.model} model on {model.device}, batches of {args.batch_size}, each a shape not seen before")
        timings: dict[str, list[float]] = {name: [] for name in variants}
        start = args.batch_size
        for round_index in range(args.rounds):
            for name, backends in variants.items():
                # The forward passes read the module's list at every call.
                backbone_module.ATTENTION_BACKENDS = backends
                part = items[start : start + per_slice]
                start += per_slice
                began = time.perf_counter()
                for first in range(0, per_slice, args.batch_size):
                    model.encode(part[first : first + args.batch_size], batch_size=args.batch_size)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timings[name].append(1000 * (time.perf_counter() - began) / args.batches)
                print(f"  round {round_index}: {name}: {timings[name][-1]:.1f} ms per batch", flush=True)
    theirs, ours = (min(values) for values in timings.values())
    print(f"best round: torch's choice {theirs:.1f} ms, unime's {ours:.1f} ms per batch: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
