"""`unime mine --engine ray` on a real local Ray cluster (2 CPUs, once for this module) writes the rows the local
run writes."""

from __future__ import annotations

import json

import pytest

from unime.cli import main
from unime.data_synth.tasks import TaskSynthConfig, write_task_examples

pytestmark = pytest.mark.slow


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mining_on_ray_writes_the_local_rows(ray_local, tiny_dir, tmp_path):
    config = TaskSynthConfig(train=12, held_out=0, negatives=1, seed=5, image_size=48, recipes=("retrieval_t2i",))
    train = write_task_examples(tmp_path / "data", config).shard_paths("train")[0]
    common = ["--top-k", "6", "--negatives", "3", "--margin", "10"]
    local, on_ray = tmp_path / "local" / "mined.jsonl", tmp_path / "ray" / "mined.jsonl"
    assert main(["mine", str(tiny_dir), str(train), str(local), *common]) == 0
    ray_flags = ["--engine", "ray", "--ray.num-workers", "1", "--ray.batch-size", "4"]
    assert main(["mine", str(tiny_dir), str(train), str(on_ray), *common, *ray_flags]) == 0

    expected, got = _rows(local), _rows(on_ray)
    assert len(got) == len(expected) == 12
    for mined, wanted in zip(got, expected, strict=True):
        assert {k: v for k, v in mined.items() if k != "scores"} == {k: v for k, v in wanted.items() if k != "scores"}
        assert mined["scores"] == pytest.approx(wanted["scores"], abs=1e-5)
    manifest = json.loads((on_ray.parent / "mined.manifest.json").read_text())
    assert manifest["details"]["embeddings_computed"] > 0  # embedded on the cluster, into its own cache
