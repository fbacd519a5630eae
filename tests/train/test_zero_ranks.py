"""DeepSpeed ZeRO-2/3 across two real CPU ranks (gloo), through the one training loop.

Each stage runs once per module under `torchrun --nproc_per_node 2` with the variables `accelerate launch` sets
for DeepSpeed (the command of docs/training.md, "ZeRO across ranks"); `_zero_worker.py` records what each rank
holds and the in-memory model's embeddings. The reference is one plain process on the concatenated batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import unime
from tests.train._zero_worker import TEXTS, zero_config
from unime.data.dataset import load_examples
from unime.data_synth.pairs import write_image_caption_pairs
from unime.train.checkpoint import TrainerState, check_world_size, latest_checkpoint
from unime.train.loop import deepspeed_ranks_on_cpu, train
from unime.train.model import load_for_training

WORKER = Path(__file__).with_name("_zero_worker.py")
ROOT = Path(__file__).resolve().parents[2]
PER_RANK_BATCH = 4


def zero_environment(stage: str) -> dict[str, str]:
    """What `accelerate launch --config_file recipes/accelerate/zero<N>.yaml` sets, for torchrun on CPUs."""
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "DS_ACCELERATOR": "cpu",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "recipes" / "deepspeed" / f"{stage}.json"),
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
    }


def launch(stage: str, shapes: dict[str, Path], run_dir: Path, kill_at: int | None = None):
    """Two ranks of `_zero_worker.py`; returns the finished process and the records of both ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    command += [str(run_dir / "records"), str(shapes["train"]), str(run_dir / "out"), str(PER_RANK_BATCH)]
    command += [str(kill_at)] if kill_at is not None else []
    done = subprocess.run(
        command, cwd=run_dir, env=zero_environment(stage), capture_output=True, text=True, timeout=600
    )
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "records").glob("rank*.json"))]
    return done, records


def finished(stage: str, shapes, run_dir: Path) -> list[dict]:
    done, records = launch(stage, shapes, run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert [(r["rank"], r["processes"], r["backend"]) for r in records] == [(0, 2, "DEEPSPEED"), (1, 2, "DEEPSPEED")]
    return records


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_image_caption_pairs(tmp_path_factory.mktemp("shapes"), seed=0)


@pytest.fixture(scope="module")
def zero2(shapes, tmp_path_factory) -> list[dict]:
    return finished("zero2", shapes, tmp_path_factory.mktemp("zero2"))


@pytest.fixture(scope="module")
def zero3(shapes, tmp_path_factory) -> list[dict]:
    return finished("zero3", shapes, tmp_path_factory.mktemp("zero3"))


@pytest.fixture(scope="module")
def one_process(shapes, tmp_path_factory) -> Path:
    """The same run as one plain process (no DeepSpeed) on the concatenated batch: 2 x the per-rank batch."""
    config = zero_config(str(shapes["train"]), str(tmp_path_factory.mktemp("one") / "out"), 2 * PER_RANK_BATCH)
    examples, _ = load_examples([shapes["train"]])
    return train(config, load_for_training(config.model), examples)


def weights(directory: str | Path) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in unime.load(directory).hf_model.named_parameters()}


@pytest.mark.slow
def test_zero2_ranks_each_hold_half_of_the_optimizer_state_and_all_parameters(zero2) -> None:
    for record in zero2:
        # 34,816 trainable (LoRA) elements: 17,408 of AdamW's exp_avg on each rank (and as many exp_avg_sq).
        assert record["trainable_total"] == record["counted_trainable"] > 0
        assert abs(record["optimizer_state_held"] - record["trainable_total"] / 2) <= 64, record
        assert record["parameters_held"] == record["parameters_total"], "ZeRO-2 keeps every parameter on every rank"


@pytest.mark.slow
def test_zero3_ranks_each_hold_half_of_the_parameters_and_of_the_optimizer_state(zero3) -> None:
    for record in zero3:
        # Measured: 131,264 of 262,528 parameter elements and 17,408 of 34,816 optimizer-state elements per rank.
        assert abs(record["parameters_held"] - record["parameters_total"] / 2) <= 64 * 64, record
        assert abs(record["optimizer_state_held"] - record["trainable_total"] / 2) <= 64, record
    assert sum(r["parameters_held"] for r in zero3) >= zero3[0]["parameters_total"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_zero_ranks_end_with_the_weights_of_one_process_on_the_concatenated_batch(
    stage: str, request: pytest.FixtureRequest, one_process: Path
) -> None:
    records = request.getfixturevalue(stage)
    expected, got = weights(one_process), weights(records[0]["final_dir"])
    start = dict(load_for_training(zero_config("unused", "unused", 1).model).hf_model.named_parameters())
    assert got.keys() == expected.keys()
    moved = max((expected[name] - start[name]).abs().max().item() for name in expected)
    assert moved > 1e-3  # 4 optimizer steps moved the weights
    # The ranks sum their gradients in another float32 order than one process does, and AdamW divides by the root of
    # the second moment: where a gradient is near zero, that rounding becomes a visible step. Measured after 4 steps
    # that moved the weights 1.7e-2: ZeRO-2 at most 1.0e-5 from one process, ZeRO-3 8e-6 (gate_proj of layer 0,
    # most other weights within 1e-6), while training on one rank's half of the batch ends 2.0e-2 away.
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=moved / 500, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_the_gathered_save_loads_and_encodes_like_the_in_memory_model(stage: str, request: pytest.FixtureRequest):
    records = request.getfixturevalue(stage)
    in_memory = np.asarray(records[0]["embeddings"])
    np.testing.assert_allclose(np.asarray(records[1]["embeddings"]), in_memory, atol=1e-6)  # both ranks agree
    np.testing.assert_allclose(unime.load(records[0]["final_dir"]).encode(TEXTS), in_memory, atol=1e-5)


@pytest.mark.slow
def test_a_zero3_run_killed_after_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(
    zero3, shapes, tmp_path: Path
) -> None:
    killed, _ = launch("zero3", shapes, tmp_path, kill_at=3)
    assert killed.returncode != 0
    output = tmp_path / "out"
    assert latest_checkpoint(output).name == "step-00000002" and not (output / "final").exists()
    shards = sorted(p.name for p in (latest_checkpoint(output) / "pytorch_model").iterdir())
    assert [name for name in shards if "optim_states" in name] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    resumed = finished("zero3", shapes, tmp_path)
    expected, got = weights(zero3[0]["final_dir"]), weights(resumed[0]["final_dir"])
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_resuming_a_two_rank_checkpoint_with_one_process_names_both_world_sizes(zero2, shapes, tmp_path: Path):
    written = Path(zero2[0]["final_dir"]).parent
    shutil.copytree(written / "checkpoints", tmp_path / "checkpoints")
    state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    config = zero_config(str(shapes["train"]), str(tmp_path), 2 * PER_RANK_BATCH)
    examples, _ = load_examples([shapes["train"]])
    with pytest.raises(unime.ConfigError, match=r"written by a run of 2 process\(es\), and this run has 1"):
        train(config, load_for_training(config.model), examples)
    assert not (tmp_path / "final").exists()


def test_a_checkpoint_of_one_process_resumed_by_two_names_both_world_sizes(tmp_path: Path) -> None:
    with pytest.raises(unime.ConfigError, match=r"written by a run of 1 process\(es\), and this run has 2"):
        check_world_size(tmp_path, TrainerState(step=2, world_size=1), 2)
    check_world_size(tmp_path, TrainerState(step=2, world_size=2), 2)
    check_world_size(tmp_path, TrainerState(step=2), 2)  # an older checkpoint, without the number: not refused


def test_deepspeed_ranks_on_cpu_join_one_gloo_group_only_under_a_launcher(monkeypatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not deepspeed_ranks_on_cpu()  # one plain process: DeepSpeed starts its own single-rank group
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert deepspeed_ranks_on_cpu() is not torch.cuda.is_available()  # GPUs keep accelerate's own backend (nccl)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    assert not deepspeed_ranks_on_cpu()


def test_accelerate_cpu_flag_beside_deepspeed_is_refused_rather_than_training_without_deepspeed(monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(unime.ConfigError, match="accelerate would train without DeepSpeed. Unset ACCELERATE_USE_CPU"):
        deepspeed_ranks_on_cpu()
