"""One run of the training loop, as one rank of a ZeRO launch (or as one plain process), that records what it holds.

Run under `torchrun --nproc_per_node 2` with accelerate's DeepSpeed variables (`ACCELERATE_USE_DEEPSPEED=true`,
`ACCELERATE_DEEPSPEED_CONFIG_FILE=recipes/deepspeed/zero3.json`), as `accelerate launch` sets them:

    python _zero_worker.py RECORD_DIR TRAIN_FILE OUTPUT_DIR BATCH_SIZE [KILL_AT_STEP]

It trains the stage-2 recipe's config (dropout off, so one process and two draw the same masks) through
`unime.train.loop.train` and writes `RECORD_DIR/rank<r>.json`: the backend, the number of processes, the parameter
and optimizer-state elements this rank holds against the model's totals (read after the first step from the
DeepSpeed engine), and the in-memory model's embeddings of a few texts after the last step (through the loop's
evaluation hook, which runs on every rank: under ZeRO-3 a forward pass gathers the shards it needs). With
KILL_AT_STEP each rank kills itself (SIGKILL) right after that step, as a crash would.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "stage2_hardneg_instruct.yaml"
TEXTS = ["a red circle on the left", "a purple square at the bottom", "a green triangle on the top"]


def zero_config(train_file: str, output_dir: str, batch_size: int, *extra: str):
    """The stage-2 recipe's config, small: 4 steps, a checkpoint at step 2, no dropout, no GradCache."""
    from unime.train.config import load_train_config

    return load_train_config(
        CONFIG,
        [
            f"data.train_files=[{train_file}]",
            "data.eval_files=[]",
            f"output_dir={output_dir}",
            "log_with=[]",
            f"optim.batch_size={batch_size}",
            "optim.max_steps=4",
            "optim.warmup_steps=1",
            "optim.gradcache_chunk_size=null",
            "model.lora.dropout=0.0",
            "save_every=2",
            *extra,
        ],
    )


def held_elements(accelerator, model) -> dict[str, int]:
    """Parameter and optimizer-state elements on this rank, and the model's totals.

    A ZeRO-3 parameter keeps only this rank's shard (`ds_tensor`) and its full size (`ds_numel`); the optimizer
    state is AdamW's `exp_avg` (`exp_avg_sq` has the same size) of the inner torch optimizer, which ZeRO-2/3 give
    only this rank's flat fp32 partition.
    """
    from unime.train.trainable import count_parameters

    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)  # set by prepare() under DeepSpeed only
    engine = wrapped.engine if wrapped is not None else None
    optimizer = engine.optimizer.optimizer if engine is not None else accelerator._optimizers[0].optimizer
    parameters = list(model.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    return {
        "parameters_held": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in parameters),
        "parameters_total": sum(getattr(p, "ds_numel", p.numel()) for p in parameters),
        "trainable_total": sum(getattr(p, "ds_numel", p.numel()) for p in trainable),
        "optimizer_state_held": sum(s["exp_avg"].numel() for s in optimizer.state.values() if "exp_avg" in s),
        "counted_trainable": count_parameters(model)[0],
    }


def main(record_dir: str, train_file: str, output_dir: str, batch_size: int, kill_at: int | None) -> None:
    from unime.train.data import load_recipe_data
    from unime.train.loop import make_accelerator, train
    from unime.train.model import load_for_training

    config = zero_config(train_file, output_dir, batch_size)
    # The model first, as the recipes do: an Accelerator made before it would build it sharded (ZeRO-3's zero.Init).
    module = load_for_training(config.model)
    accelerator = make_accelerator(config)
    examples, _ = load_recipe_data(config.data)
    record: dict = {
        "rank": accelerator.process_index,
        "processes": accelerator.num_processes,
        "backend": accelerator.distributed_type.value,
    }

    def on_step(step: int, logs: dict) -> None:
        if step == 1:
            record.update(held_elements(accelerator, module))
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def eval_hook(model, step: int) -> dict[str, float]:
        record["embeddings"] = model.encode(TEXTS).tolist()
        return {}

    record["final_dir"] = str(
        train(config, module, examples, accelerator=accelerator, on_step=on_step, eval_hook=eval_hook)
    )
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    (Path(record_dir) / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else None)
