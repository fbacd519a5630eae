"""ZeRO-3 memory benchmark: peak memory per rank of two ZeRO-3 ranks against one process without ZeRO.

Both runs full-fine-tune the same model (a tiny-family Qwen2-VL with a 1024-wide, 8-layer language model: 104 M
parameters, every one trainable, so that parameters, gradients and AdamW's two moments outweigh activations) for
a few steps through the one training loop (`unime.train.loop.train`) on drawn shapes, with the same per-process
batch:

- one process, plain (no DeepSpeed): `python bench/zero_memory.py --child ...`;
- two ZeRO-3 ranks over gloo: `torchrun --nproc_per_node 2` with accelerate's DeepSpeed variables
  (`ACCELERATE_USE_DEEPSPEED=true`, `ACCELERATE_DEEPSPEED_CONFIG_FILE=recipes/deepspeed/zero3.json`).

    OMP_NUM_THREADS=1 .venv/bin/python bench/zero_memory.py [--steps 2] [--batch-size 2] [--hidden 1024]
        [--layers 8] [--deepspeed-config recipes/deepspeed/zero3.json] [--malloc-mmap-threshold 65536]

What is measured, per process:
- peak resident set: the kernel's high-water mark of the process (`resource.getrusage(...).ru_maxrss`, VmHWM on
  Linux), read at the end of the run; and the same mark read after the imports, before the model is built. Their
  difference, the growth, is what the model and its training add to an idle Python process with torch,
  accelerate and DeepSpeed loaded; the ratio of growths is the headline, the ratio of whole peaks beside it.
- state held after the first step (exact, not sampled): parameter bytes this process holds (a ZeRO-3 rank: its
  shards, `ds_tensor`) and AdamW state bytes (`exp_avg`, `exp_avg_sq`) of the optimizer that steps it.

`--malloc-mmap-threshold N` sets glibc's `MALLOC_MMAP_THRESHOLD_` for both runs alike. A ZeRO-3 rank allocates
and frees parameter-sized tensors all through a step (gathered parameters, gradients before the reduce-scatter);
with glibc's default, whose mmap threshold grows to the size of the first large block freed, those land in
malloc's heap and their freed pages stay resident, so the peak counts memory no tensor holds any more. A fixed
threshold serves each large tensor with its own mapping, returned to the system when it is freed.

Each rank builds the whole model before the engine shards it (as the recipes do; `zero3_init_flag: false`); that
copy is freed (and its pages returned) when the engine partitions it, before the first step. Ratios are between
runs of one invocation."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "stage2_hardneg_instruct.yaml"
KIB = 1024 if sys.platform != "darwin" else 1  # ru_maxrss is in KiB on Linux, in bytes on macOS


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def held_bytes(accelerator, model) -> dict[str, int]:
    """Parameter bytes this process holds (ZeRO-3: its shards) and the bytes of AdamW's moments it keeps."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)  # set by prepare() under DeepSpeed only
    engine = wrapped.engine if wrapped is not None else None
    optimizer = engine.optimizer.optimizer if engine is not None else accelerator._optimizers[0].optimizer
    return {
        "parameter_bytes": sum(
            (p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in model.parameters()
        ),
        "optimizer_state_bytes": sum(
            t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0
        ),
    }


def wide_embedder(hidden: int, layers: int):
    """A Qwen2-VL embedder of the tiny family (same tokenizer and processor) with a wide, deep language model.

    The backbone's own tiny builder, at a size the registry does not offer: parameters and optimizer state must
    outweigh activations and the libraries' own memory for the comparison to be about ZeRO.
    """
    import unime
    from unime.backbones.qwen2_vl import _build_tiny

    vision = dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14)
    vision.update(spatial_merge_size=2, temporal_patch_size=2)
    text = dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4, layers=layers, heads=hidden // 128)
    model, processor = _build_tiny(
        0,
        config_class="Qwen2VLConfig",
        model_class="Qwen2VLForConditionalGeneration",
        processor_class="Qwen2VLProcessor",
        vision=vision,
        text=text,
    )
    return unime.Embedder(model, processor, unime.UnimeConfig(backbone="qwen2_vl"))


def child(out_dir: str, train_file: str, steps: int, batch_size: int, hidden: int, layers: int) -> None:
    """One process (or one rank) of a run: train, then write its measurements to `out_dir/rank<r>.json`."""
    import torch

    torch.set_num_threads(1)
    from unime.data.dataset import load_examples
    from unime.train.config import load_train_config
    from unime.train.loop import make_accelerator, train

    baseline = peak_rss_bytes()
    config = load_train_config(
        CONFIG,
        [
            f"data.train_files=[{train_file}]",
            "data.eval_files=[]",
            f"output_dir={Path(out_dir) / 'run'}",
            "log_with=[]",
            "save_every=0",
            f"optim.batch_size={batch_size}",
            "data.num_negatives=1",
            f"optim.max_steps={steps}",
            "optim.warmup_steps=0",
            "optim.gradcache_chunk_size=null",
            "model.lora.enabled=false",
            "model.freeze_vision=false",
        ],
    )
    module = wide_embedder(hidden, layers)
    examples, _ = load_examples([train_file])
    accelerator = make_accelerator(config)
    record: dict = {"rank": accelerator.process_index, "processes": accelerator.num_processes}

    marks = {"model built": peak_rss_bytes()}

    def on_step(step: int, logs: dict) -> None:
        if step == 1:
            record.update(held_bytes(accelerator, module))
            marks["step 1"] = peak_rss_bytes()
        marks[f"step {step}"] = peak_rss_bytes()

    train(config, module, examples, accelerator=accelerator, on_step=on_step)
    record.update(
        backend=accelerator.distributed_type.value,
        parameters=sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()),
        baseline_rss_bytes=baseline,
        peak_rss_bytes=peak_rss_bytes(),
        marks=marks,
    )
    (Path(out_dir) / f"rank{record['rank']}.json").write_text(json.dumps(record))


def run(out_dir: Path, train_file: Path, args: argparse.Namespace, zero3: bool) -> list[dict]:
    """Start one plain process, or two ZeRO-3 ranks under torchrun; return each process's record."""
    out_dir.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    launcher = [sys.executable]
    if zero3:
        env.update(
            DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
            ACCELERATE_USE_DEEPSPEED="true",
            ACCELERATE_DEEPSPEED_CONFIG_FILE=str(Path(args.deepspeed_config).resolve()),
            ACCELERATE_DEEPSPEED_ZERO3_INIT="false",
        )
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the flag alone decides, so that the printed setting is the one used
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    sizes = [str(args.steps), str(args.batch_size), str(args.hidden), str(args.layers)]
    command = [*launcher, __file__, "--child", str(out_dir), str(train_file), *sizes]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=2, help="examples per process and step")
    parser.add_argument("--hidden", type=int, default=1024, help="the language model's width (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=8, help="the language model's layers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--deepspeed-config", default=str(ROOT / "recipes" / "deepspeed" / "zero3.json"), help="the ZeRO-3 JSON"
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for both runs; default: glibc's own, which adapts",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out, train_file, *sizes = args.child
        child(out, train_file, *map(int, sizes))
        return

    from unime.data_synth.pairs import write_image_caption_pairs

    with tempfile.TemporaryDirectory() as tmp:
        shapes = write_image_caption_pairs(Path(tmp) / "shapes", seed=0)
        one = run(Path(tmp) / "one", shapes["train"], args, zero3=False)
        ranks = run(Path(tmp) / "zero3", shapes["train"], args, zero3=True)
    (single,) = one
    assert single["processes"] == 1 and [r["processes"] for r in ranks] == [2, 2], (one, ranks)
    assert [r["backend"] for r in ranks] == ["DEEPSPEED", "DEEPSPEED"], ranks
    print(f"model: {single['parameters']:,} parameters, all trained; {args.steps} steps, batch {args.batch_size}")
    threshold = args.malloc_mmap_threshold
    print(f"glibc malloc, both runs: {'default' if threshold is None else f'MALLOC_MMAP_THRESHOLD_={threshold}'}")
    print("| run | parameters held | AdamW state held | peak RSS | growth over imports |")
    print("|---|---|---|---|---|")
    for name, record in [("one process, no ZeRO", single)] + [(f"ZeRO-3 rank {r['rank']} of 2", r) for r in ranks]:
        growth = record["peak_rss_bytes"] - record["baseline_rss_bytes"]
        print(
            f"| {name} | {mib(record['parameter_bytes'])} | {mib(record['optimizer_state_bytes'])} | "
            f"{mib(record['peak_rss_bytes'])} | {mib(growth)} |"
        )
    print(
        "peak RSS growth by then: "
        + "; ".join(
            f"{name}: "
            + ", ".join(f"{mark} {mib(value - r['baseline_rss_bytes'])}" for mark, value in r["marks"].items())
            for name, r in [("one process", single), ("ZeRO-3 rank 0", ranks[0])]
        )
    )
    worst = max(ranks, key=lambda r: r["peak_rss_bytes"] - r["baseline_rss_bytes"])
    growth_ratio = (worst["peak_rss_bytes"] - worst["baseline_rss_bytes"]) / (
        single["peak_rss_bytes"] - single["baseline_rss_bytes"]
    )
    state_ratio = (worst["parameter_bytes"] + worst["optimizer_state_bytes"]) / (
        single["parameter_bytes"] + single["optimizer_state_bytes"]
    )
    print(
        f"ZeRO-3 rank / one process: peak RSS growth {growth_ratio:.2f}x, whole peak RSS "
        f"{worst['peak_rss_bytes'] / single['peak_rss_bytes']:.2f}x, parameters + AdamW state held {state_ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
