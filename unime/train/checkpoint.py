"""Resumable checkpoints: accelerate's full state plus the data position, written atomically.

A checkpoint is `<output_dir>/checkpoints/step-00000100/`: model, optimizer, scheduler and every RNG (through
`accelerator.save_state`) and `trainer_state.json` (step, epoch, batches consumed in the epoch). It is written
to a `.tmp` folder and renamed once complete, so an interrupted save leaves the previous checkpoint as the
latest one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "trainer_state.json"
PREFIX = "step-"


@dataclass
class TrainerState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current pass over the data."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed."""


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


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainerState, keep: int) -> Path:
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
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and p.suffix != ".tmp")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))
