"""Resumable checkpoints: accelerate's full state plus the data position, written atomically.

A checkpoint is `<output_dir>/checkpoints/step-00000100/`: model, optimizer and every RNG (through
`accelerator.save_state`), `scheduler.json` (the learning-rate scheduler's state dict) and `trainer_state.json`
(step, epoch, batches consumed in the epoch, and the number of processes that wrote it: the data position and a
ZeRO checkpoint's shards are per process, so a resume with another number is refused). It is written to a `.tmp`
folder and renamed once complete, so an interrupted save leaves the previous checkpoint as the latest one.

A checkpoint folder is data, not code. The scheduler state is JSON rather than accelerate's custom-object pickle
(`custom_checkpoint_0.pkl`, which accelerate unpickles with `weights_only=False`, so a planted file would run
code on resume). What accelerate itself writes is safetensors (`model.safetensors`) or torch-format files that
it reads back with `torch.load(weights_only=True)`, torch's restricted unpickler that rebuilds tensors and plain
containers only: `optimizer.bin` and `random_states_<rank>.pkl`. Under DeepSpeed, the engine writes its own
checkpoint files, which DeepSpeed reads with `weights_only=False`: resume those only from folders you wrote.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from unime.errors import ConfigError

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
# What accelerate writes for an object given to `register_for_checkpointing`: a pickle it loads with
# weights_only=False. Checkpoints of older versions of this loop hold the scheduler there.
_PICKLED_SCHEDULER = "custom_checkpoint_0.pkl"
PREFIX = "step-"


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current pass over the data."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed."""
    world_size: int | None = None
    """Processes (ranks) of the run that wrote the checkpoint; None in checkpoints of older versions."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (a `.tmp` folder is an interrupted save and is ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    complete = [
        p for p in root.iterdir() if p.name.startswith(PREFIX) and p.suffix != ".tmp" and (p / STATE_FILE).is_file()
    ]
    return max(complete, key=lambda p: p.name, default=None)


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, scheduler, keep: int) -> Path:
    """Write a checkpoint of the accelerator's objects, `scheduler` (as JSON) and `state`; keep the `keep` newest."""
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    staging = final.with_suffix(".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / SCHEDULER_FILE).write_text(json.dumps(_json_state(scheduler.state_dict()), indent=2))
        written = replace(state, world_size=accelerator.num_processes)
        (staging / STATE_FILE).write_text(json.dumps(asdict(written), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.suffix != ".tmp")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, scheduler) -> TrainerState:
    """Restore the accelerator's objects and `scheduler` from a checkpoint; return its trainer state."""
    if (path / _PICKLED_SCHEDULER).exists():
        raise ConfigError(
            f"{path}: holds the scheduler state as a pickle ({_PICKLED_SCHEDULER}, from an older version), which "
            f"this version does not unpickle; resume with the version that wrote it, or delete {path.parent} to "
            "train from the start"
        )
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    check_world_size(path, state, accelerator.num_processes)
    accelerator.load_state(str(path))
    scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    return state


def check_world_size(path: Path, state: TrainerState, processes: int) -> None:
    """Refuse to resume with another number of processes than the run that wrote the checkpoint.

    Each process draws its rows of every global batch (per-process batch x processes) by its rank, and under ZeRO
    each holds its own shard of the optimizer state (and parameters): with another number of processes the data
    position, the global batch and the shards no longer match the checkpoint.
    """
    if state.world_size is not None and state.world_size != processes:
        raise ConfigError(
            f"{path}: written by a run of {state.world_size} process(es), and this run has {processes}: the data "
            f"position and ZeRO's optimizer shards are per process. Resume with {state.world_size} process(es) "
            "(e.g. torchrun --nproc_per_node), or train from the start in another output_dir"
        )


def _json_state(state: dict) -> dict:
    """The scheduler's state dict, checked to be plain JSON data (a closure's `lr_lambdas` entry is None)."""
    try:
        json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"the scheduler's state dict cannot be saved as JSON ({err}): {state!r:.300}") from err
    return state
