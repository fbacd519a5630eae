"""GradCache benchmark: peak memory and step time against contrastive batch size, with and without GradCache.

One training step (forward + InfoNCE loss + backward) of the tiny Qwen2-VL embedder in train mode, on text
queries (captions) against drawn-image positives, at each batch size, once on the plain path
(`encode_without_cache`, the whole batch in one chunk) and once with GradCache (`encode_with_grad_cache`,
chunks of `--chunk-size`). Each (size, mode) runs in a fresh child process, so that no run inherits
another's allocator state or peak; ratios are between runs of one invocation.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gradcache.py [--sizes 8 16 32 64 128 256] [--chunk-size 8]
        [--image-size 224] [--repeats 3] [--threads 1] [--device cpu|cuda]

What is measured, per (size, mode):
- time per example: the best of `--repeats` steps, divided by the batch size (after a warm-up step).
- peak step memory. On CUDA: `torch.cuda.max_memory_allocated()` during the step minus the memory allocated
  before it. On CPU: the process's peak resident set during the step (`VmHWM`, reset just before the step
  through `/proc/self/clear_refs`) minus its resident set before it, measured after `malloc_trim` has
  returned freed heap pages to the OS. This is what the machine feels, and also
  what is noisiest: the allocator keeps freed memory, and a tiny model's activations are small next to a
  Python process. The baseline is taken after the model, the tokenized batch and a warm-up step on two
  pairs, so weights, inputs and gradient buffers (the same in both modes) are not counted.
- peak saved activations: the largest total, at any moment of the step, of tensors autograd holds for
  backward (deduplicated by storage, weights and inputs excluded), counted by a saved-tensors hook. It is
  allocator-independent and exactly the memory GradCache is designed to bound (plain: all of the batch's
  activations; GradCache: one chunk's, plus the loss's small `[N, D]` graph), but it leaves out transient
  tensors freed within a forward pass. It is measured on a separate step so its hook does not touch the
  timed ones.
The images are drawn at `--image-size` (default 224 px, 256 patches, 64 image tokens: the tiny processor's
own limit of 112 px is raised for this run) so that activations grow large enough to show above the noise.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("plain", "gradcache")
TEMPERATURE = 0.05
WARMUP_PAIRS = 2


# ----------------------------------------------------------------------------------------------------------
# Child: one (size, mode) in a fresh process
# ----------------------------------------------------------------------------------------------------------
class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd saves for backward, counted once per storage.

    Use its `hooks()` as a context manager around a step. Each saved tensor is wrapped in a `_Saved` holder
    that autograd keeps exactly as long as it would keep the tensor; the holder's finaliser releases the count
    when the graph that saved it is freed (after its backward, or when dropped).
    """

    def __init__(self, excluded_storages: set[tuple[str, int]]) -> None:
        self.excluded = excluded_storages
        self.references: dict[tuple[str, int], list[int]] = {}  # storage -> [holders, nbytes]
        self.current = 0
        self.peak = 0

    def hooks(self) -> Any:
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: Any) -> _Saved:
        key = _storage_key(tensor)
        if key in self.excluded:
            return _Saved(self, None, tensor)
        entry = self.references.setdefault(key, [0, tensor.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Saved(self, key, tensor)

    @staticmethod
    def _unpack(saved: _Saved) -> Any:
        return saved.tensor

    def release(self, key: tuple[str, int]) -> None:
        entry = self.references[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.references[key]


class _Saved:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedTensorMeter, key: tuple[str, int] | None, tensor: Any) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        if self.key is not None:
            self.meter.release(self.key)


def _storage_key(tensor: Any) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: CPU peak memory needs Linux (or use --device cuda)")
    return int(match.group(1))


def _release_free_heap() -> None:
    """Hand memory that is freed but still mapped (left by tokenization, the warm-up) back to the OS.

    Otherwise the step would reuse those pages without growing the resident set, and a batch whose inputs
    left more free heap behind would look cheaper. glibc only; elsewhere the measure is just noisier.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_resident() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current resident set (Linux >= 4.0)


def make_pairs(count: int, image_size: int, seed: int = 0) -> tuple[list[str], list]:
    """`count` captions and the scenes they describe, drawn at `image_size` px."""
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    return [describe(scene) for scene in scenes], [draw_scene(scene, size=image_size) for scene in scenes]


def measure(model_dir: str, size: int, mode: str, chunk_size: int, image_size: int, repeats: int, device: str) -> dict:
    """Peak memory and best step time of one (size, mode), in this process."""
    import torch
    import torch.nn.functional as F

    import unime
    from unime.inputs import parse_inputs
    from unime.train.gradcache import encode_with_grad_cache, encode_without_cache, split_into_chunks

    embedder = unime.load(model_dir, device=device)
    # Let images keep their drawn size (the tiny processor caps them at 112 px).
    embedder.processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": image_size * image_size}
    embedder.train()
    step_fn = encode_with_grad_cache if mode == "gradcache" else encode_without_cache
    step_chunk = chunk_size if mode == "gradcache" else None

    def info_nce(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = embeddings["query"] @ embeddings["positive"].T / TEMPERATURE  # [B, B]
        return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))

    def features_of(count: int) -> dict[str, list[dict[str, torch.Tensor]]]:
        captions, images = make_pairs(count, image_size)
        tokenize = embedder.tokenize
        return {
            "query": [_to(tokenize(parse_inputs(chunk)), device) for chunk in split_into_chunks(captions, step_chunk)],
            "positive": [_to(tokenize(parse_inputs(chunk)), device) for chunk in split_into_chunks(images, step_chunk)],
        }

    def step(chunks: dict[str, list[dict[str, torch.Tensor]]]) -> float:
        embedder.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not the batch's memory
        loss = step_fn(embedder.embed, chunks, info_nce)
        return float(loss)

    def synchronize() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # Warm-up on two pairs: lazy initialisation and gradient buffers land before the baseline.
    step(features_of(WARMUP_PAIRS))
    chunks = features_of(size)
    gc.collect()
    synchronize()

    # Peak memory of one step.
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step(chunks)
        synchronize()
        peak_bytes = torch.cuda.max_memory_allocated() - before
    else:
        _release_free_heap()
        before_kib = _resident_kib("VmRSS")
        _reset_peak_resident()
        loss = step(chunks)
        peak_bytes = (_resident_kib("VmHWM") - before_kib) * 1024

    # Peak saved activations, on a step of its own.
    excluded = {_storage_key(param) for param in embedder.parameters()}
    excluded |= {_storage_key(tensor) for group in chunks.values() for part in group for tensor in part.values()}
    meter = SavedTensorMeter(excluded)
    with meter.hooks():
        step(chunks)
    assert meter.current == 0, "saved tensors outlived their step: the meter or the step leaks a graph"

    # Time: best of `repeats` steps.
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step(chunks)
        synchronize()
        best = min(best, time.perf_counter() - start)

    return {
        "size": size,
        "mode": mode,
        "loss": loss,
        "peak_bytes": peak_bytes,
        "saved_peak_bytes": meter.peak,
        "seconds_per_example": best / size,
    }


def _to(features: dict[str, Any], device: str) -> dict[str, Any]:
    return {key: value.to(device) for key, value in features.items()}


# ----------------------------------------------------------------------------------------------------------
# Parent: one child per (size, mode), then the table
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    size: int
    mode: str
    loss: float
    peak_bytes: int
    saved_peak_bytes: int
    seconds_per_example: float


def run_child(model_dir: str, size: int, mode: str, args: argparse.Namespace) -> Result:
    request = dict(
        model_dir=model_dir,
        size=size,
        mode=mode,
        chunk_size=args.chunk_size,
        image_size=args.image_size,
        repeats=args.repeats,
        device=args.device,
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, __file__, "--child", json.dumps(request), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} run at batch {size} failed:\n{done.stderr[-4000:]}")
    return Result(**json.loads(done.stdout.strip().splitlines()[-1]))


def print_table(results: dict[tuple[int, str], Result], sizes: list[int], args: argparse.Namespace) -> None:
    memory_name = "CUDA allocated" if args.device.startswith("cuda") else "resident set (RSS)"
    print(
        f"tiny qwen2_vl, train mode, text queries vs {args.image_size}px drawn images, InfoNCE, one step; "
        f"GradCache chunk {args.chunk_size}; {args.threads} torch thread(s), {args.device}; "
        f"time: best of {args.repeats}\n"
        f"peak step memory = {memory_name} growth during the step; saved = peak activations held for backward; "
        f"'vs {sizes[0]}' = relative to batch {sizes[0]} in the same mode\n"
    )
    header = (
        f"{'batch':>5s} | {'plain ms/ex':>11s} {'GC ms/ex':>9s} {'GC/plain':>8s} | "
        f"{'plain MB':>8s} {'GC MB':>7s} {'vs ' + str(sizes[0]):>6s} {'GC vs':>6s} | "
        f"{'plain saved':>11s} {'GC saved':>8s} {'vs ' + str(sizes[0]):>6s} {'GC vs':>6s} | {'loss diff':>9s}"
    )
    print(header)
    print("-" * len(header))
    mib = 2**20
    first = {mode: results[sizes[0], mode] for mode in MODES}
    for size in sizes:
        plain, cached = results[size, "plain"], results[size, "gradcache"]
        print(
            f"{size:5d} | {plain.seconds_per_example * 1e3:11.2f} {cached.seconds_per_example * 1e3:9.2f} "
            f"{cached.seconds_per_example / plain.seconds_per_example:7.2f}x | "
            f"{plain.peak_bytes / mib:8.1f} {cached.peak_bytes / mib:7.1f} "
            f"{_ratio(plain.peak_bytes, first['plain'].peak_bytes):>6s} "
            f"{_ratio(cached.peak_bytes, first['gradcache'].peak_bytes):>6s} | "
            f"{plain.saved_peak_bytes / mib:11.1f} {cached.saved_peak_bytes / mib:8.1f} "
            f"{_ratio(plain.saved_peak_bytes, first['plain'].saved_peak_bytes):>6s} "
            f"{_ratio(cached.saved_peak_bytes, first['gradcache'].saved_peak_bytes):>6s} | "
            f"{abs(plain.loss - cached.loss):9.1e}"
        )
    print("\n(MB = MiB; 'vs' columns: plain, then GradCache; loss diff: |plain - GradCache| loss on the same batch)")


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:5.1f}x" if reference > 0 else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224, help="drawn image side in px (multiple of 28)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the stable setting here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(**json.loads(args.child))))
        return

    if any(size < 1 for size in args.sizes) or args.chunk_size < 1 or args.repeats < 1:
        parser.error("--sizes, --chunk-size and --repeats must be positive")
    if args.image_size < 28 or args.image_size % 28:
        parser.error("--image-size must be a positive multiple of 28 (2x2 merged 14 px patches)")
    sizes = sorted(set(args.sizes))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unime

    results: dict[tuple[int, str], Result] = {}
    with tempfile.TemporaryDirectory() as model_dir:
        unime.build_tiny("qwen2_vl", seed=0).save(model_dir)  # built once; each child loads it (fast)
        for size in sizes:
            for mode in MODES:
                results[size, mode] = run_child(model_dir, size, mode, args)
                print(f"  batch {size:4d} {mode:9s} done", file=sys.stderr, flush=True)
    print_table(results, sizes, args)


if __name__ == "__main__":
    main()
