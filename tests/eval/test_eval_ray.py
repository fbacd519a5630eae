"""`unime eval run --engine ray` on a real local Ray cluster (2 CPUs, once for this module) gives the local run's
metrics on the synthetic benchmark."""

from __future__ import annotations

import json

import pytest

from unime.cli import main
from unime.eval.synthetic import write_synthetic_benchmark
from unime.ray_engine import RayEncoding

pytestmark = pytest.mark.slow


def test_eval_on_ray_gives_the_local_metrics(ray_local, tiny_dir, tmp_path, monkeypatch):
    root = write_synthetic_benchmark(tmp_path / "bench", seed=0, queries=12, candidates=6)
    # The retrieval set: image queries, caption corpus, caption queries, image corpus.
    data = ["--retrieval", str(root / "retrieval" / "test.json"), "--no-plots", "--model", str(tiny_dir)]
    assert main(["eval", "run", *data, "--out", str(tmp_path / "local")]) == 0
    jobs = []
    real_fill = RayEncoding.fill

    def counted_fill(self, store, keys, items, **kwargs):
        jobs.append(len(keys))
        return real_fill(self, store, keys, items, **kwargs)

    monkeypatch.setattr(RayEncoding, "fill", counted_fill)
    ray_flags = ["--engine", "ray", "--ray.num-workers", "1", "--ray.batch-size", "8"]
    assert main(["eval", "run", *data, "--out", str(tmp_path / "ray"), *ray_flags]) == 0
    # The four sets of the dataset went to the cluster in one job (each job starts the actors and their models).
    assert len(jobs) == 1, jobs

    local = json.loads((tmp_path / "local" / "results.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert on_ray["encoder"]["engine"] == "ray" and on_ray["embedding"]["encoded"] == local["embedding"]["encoded"] > 0
    [expected], [got] = local["tasks"]["retrieval"], on_ray["tasks"]["retrieval"]
    metrics = {k: v for k, v in expected.items() if isinstance(v, (int, float))}
    assert metrics, expected
    assert {k: got[k] for k in metrics} == pytest.approx(metrics, abs=1e-6)
