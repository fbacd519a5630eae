"""`unime generate --engine ray` on a real local Ray cluster (2 CPUs, started once for this module) against the
scripted OpenAI-compatible server on a loopback port: the rows of the local run, and a run interrupted (by
endpoint errors, by a worker killed mid-job) resumes to every record once and the same rows."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

from unime.cli import main as cli_main
from unime.data_synth.manifest import Manifest
from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset
from unime.data_synth.mllm.images import open_photo
from unime.data_synth.mllm.openai_backend import OpenAIBackendConfig
from unime.data_synth.mllm.prompting import image_data_url
from unime.data_synth.mllm.ray_generation import GenerationWorker, RayBackend
from unime.ray_engine import RaySettings, Worker

from .conftest import make_photo_folder
from .scripted_server import ScriptedChatServer, photo_digest
from .test_openai_generation import BEHAVIOURS, MAX_SIDE, SLOW_S, data_files, run, script_for

pytestmark = pytest.mark.slow

# Retries are quick, and the timeout is far above an answer's time even with the cluster's processes busy.
RAY_RETRY_ARGS = {"timeout_s": 3.0, "max_retries": 2, "backoff_s": 0.05}


@pytest.fixture(scope="module")
def cluster():
    # The actors unpickle this module's worker factory: ship it by value (tests/ is not importable there).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, ten_photo_paths) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("mllm-ray") / "photos", ten_photo_paths)


@pytest.fixture(scope="module")
def local_run(photo_folder, tmp_path_factory) -> tuple[Path, Manifest]:
    """The uninterrupted local run's folder and manifest."""
    out = tmp_path_factory.mktemp("local") / "out"
    with ScriptedChatServer(script_for(photo_folder), slow_s=SLOW_S) as server:
        return out, run(photo_folder, out, server)


def ray_backend(server: ScriptedChatServer, worker_class: type[GenerationWorker] = GenerationWorker, **extra):
    openai = OpenAIBackendConfig(base_url=server.base_url, model="scripted", concurrency=2, **RAY_RETRY_ARGS)
    worker = worker_class("openai", openai=openai, **extra)
    return RayBackend(worker, RaySettings(num_workers=2, batch_size=3, max_restarts=2))


def run_on_ray(folder: Path, out: Path, backend: RayBackend) -> Manifest:
    config = GenerateConfig(image_dir=str(folder), out_dir=str(out), max_image_side=MAX_SIDE, records_per_shard=2)
    return generate_dataset(config, backend, backend_kind="openai")


def rows_by_key(out: Path) -> dict[str, dict]:
    """Every record of the folder by key (a row, or its rejection reason), each key once."""
    entries = [json.loads(line) for path in sorted(out.glob("shard-*.keys")) for line in path.read_text().splitlines()]
    rows = [json.loads(line) for path in sorted(out.glob("shard-*.jsonl")) for line in path.read_text().splitlines()]
    keys = [entry["key"] for entry in entries]
    assert len(keys) == len(set(keys)), "a record was written twice"
    kept = iter(rows)
    return {entry["key"]: entry.get("rejected") or next(kept) for entry in entries}


def without_last_run(manifest: Manifest) -> Manifest:
    details = {name: value for name, value in manifest.details.items() if name != "last_run"}
    return Manifest(**{**manifest.__dict__, "details": details, "shards": []})


def test_the_command_on_ray_writes_the_files_of_the_local_run(cluster, photo_folder, local_run, tmp_path, capsys):
    local_dir, local = local_run
    out = tmp_path / "ray"
    with ScriptedChatServer(script_for(photo_folder), slow_s=SLOW_S) as server:
        command = [
            "generate", str(photo_folder), str(out),
            "--backend", "openai", "--openai.base-url", server.base_url, "--openai.model", "scripted",
            "--openai.timeout-s", "3", "--openai.max-retries", "2", "--openai.backoff-s", "0.05",
            "--records-per-shard", "2", "--max-image-side", str(MAX_SIDE),
            "--engine", "ray", "--ray.num-workers", "2", "--ray.batch-size", "3",
        ]  # fmt: skip
        assert cli_main(command) == 0
        asked = sum(server.attempts.values())
    printed = capsys.readouterr()
    assert "11 generated, 5 kept" in printed.out and "1x endpoint_http_503" in printed.err

    assert data_files(out) == data_files(local_dir)  # byte-identical shards, key files and second views
    on_ray = Manifest.load(out)
    assert on_ray.details["last_run"]["engine"] == "ray" and local.details["last_run"]["engine"] == "local"
    assert on_ray.details["last_run"]["failed"] == local.details["last_run"]["failed"] == {"endpoint_http_503": 1}
    assert without_last_run(on_ray) == without_last_run(local)
    # Each photo asked once, but for retries: a04 too slow once, a05 HTTP 500 once, a06 429 once, a07 503 three times
    assert asked == (len(BEHAVIOURS) - 4) + 2 + 2 + 2 + 3


def test_a_run_with_endpoint_errors_resumes_to_every_record_once(cluster, photo_folder, local_run, tmp_path):
    local_dir, local = local_run
    out = tmp_path / "ray"
    script = script_for(photo_folder)
    failing = [
        photo_digest(image_data_url(open_photo(photo_folder / n), max_side=MAX_SIDE)) for n in ("a00.jpg", "a04.jpg")
    ]
    with ScriptedChatServer(script, slow_s=SLOW_S) as server:
        server.script.update({digest: "always_503" for digest in failing})  # the endpoint fails them, every retry
        first = run_on_ray(photo_folder, out, ray_backend(server))
        assert first.details["last_run"]["failed"] == {"endpoint_http_503": 3}  # a00, a04 and a07 (always)
        assert first.generated == local.generated - 2

        server.script.update({digest: script[digest] for digest in failing})  # the endpoint recovers
        before = dict(server.attempts)
        resumed = run_on_ray(photo_folder, out, ray_backend(server))
        asked_again = {digest for digest, count in server.attempts.items() if count != before.get(digest)}

    a07 = photo_digest(image_data_url(open_photo(photo_folder / "a07.jpg"), max_side=MAX_SIDE))
    assert asked_again == {*failing, a07}  # only the photos not recorded went to the cluster again
    assert resumed.details["last_run"]["failed"] == {"endpoint_http_503": 1}
    # every record once, the same rows and rejections (the two recovered rows come last in the files)
    assert rows_by_key(out) == rows_by_key(local_dir)
    assert (resumed.kept, resumed.rejected, resumed.generated) == (local.kept, local.rejected, local.generated)


@dataclass
class DiesOnce(GenerationWorker):
    """A worker whose process dies (os._exit) the first time it gets the block holding `dies_on`; a marker file
    remembers it across the actor's restart."""

    dies_on: str = ""
    marker: str = ""

    def __call__(self) -> Worker:
        work = super().__call__()

        def run(records):
            if any(record["key"] == self.dies_on for record in records) and not os.path.exists(self.marker):
                Path(self.marker).touch()
                os._exit(1)
            return work(records)

        return run


def test_a_worker_killed_mid_job_leaves_the_local_files(cluster, photo_folder, local_run, tmp_path):
    local_dir, _ = local_run
    out, marker = tmp_path / "ray", tmp_path / "died"
    with ScriptedChatServer(script_for(photo_folder), slow_s=SLOW_S) as server:
        backend = ray_backend(server, DiesOnce, dies_on="a05.jpg", marker=str(marker))
        manifest = run_on_ray(photo_folder, out, backend)
    assert marker.exists()  # an actor did die on that block; Ray restarted it and retried the block
    assert manifest.details["last_run"]["failed"] == {"endpoint_http_503": 1}
    assert data_files(out) == data_files(local_dir)  # every record once, in the local order
