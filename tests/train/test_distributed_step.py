"""Two processes (DDP over gloo) give the loss and gradients of one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_step_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], tmp_path: Path) -> None:
    # ACCELERATE_USE_CPU: under torchrun on a machine without GPUs, accelerate only forms a process group with it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "chunk"), [("info_nce", "none"), ("unime_hard_negative", "none"), ("unime_hard_negative", "3")]
)
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path: Path, loss: str, chunk: str) -> None:
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    _run([sys.executable, str(WORKER), str(single), "8", chunk, loss], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(WORKER), str(double), "4", chunk, loss], tmp_path)
    one, two = torch.load(single), torch.load(double)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert abs(one["loss"] - two["loss"]) < 1e-5, (one["loss"], two["loss"])
    assert one["grads"].keys() == two["grads"].keys()
    largest = max(g.abs().max().item() for g in one["grads"].values())
    assert largest > 0
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6 * max(1.0, largest), rtol=1e-4, msg=name)
