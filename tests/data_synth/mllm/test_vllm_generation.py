"""The generator on the real vLLM engine (CPU build) with a tiny Qwen2-VL: every junk answer is rejected with
a reason, the corrupt photo is counted, nothing is written as data, and the engine answers every request.

One engine start, in the backend's child process (the engine never runs in the pytest process; the child is
judged by the results it writes, not by its exit code).
"""

from __future__ import annotations

import json

import pytest

from unime.data_synth.manifest import Manifest
from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset
from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig

from .conftest import make_photo_folder

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ANSWER_REJECTIONS = (
    "truncated_answer",
    "invalid_json",
    "missing_field:",
    "wrong_type:",
    "invalid_choice:",
    "empty_field:",
    "self_evaluation_failed",
    "negative_equals_positive",
    "near_duplicate",
)


def test_junk_answers_of_a_tiny_model_are_rejected_with_reasons(tiny_dir, real_photo_paths, tmp_path, monkeypatch):
    folder = make_photo_folder(tmp_path / "photos", real_photo_paths)
    out = tmp_path / "out"
    backend = VllmBackend(
        VllmBackendConfig(
            model=str(tiny_dir),
            max_tokens=48,
            max_model_len=2048,
            batch_size=2,
            stage_size=2,  # three photos: two staged chunks
            temperature=1.0,
            enforce_eager=True,
            single_process=True,
        ),
        work_dir=out,
    )
    config = GenerateConfig(image_dir=str(folder), out_dir=str(out), max_image_side=112)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # inherited by the engine's process
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))
    returned = generate_dataset(config, backend, backend_kind="vllm")
    print("engine exit codes:", backend.returncodes)  # 0, or 134 when vLLM aborts at exit after its work

    manifest = Manifest.load(out)
    photos = len(real_photo_paths)  # a00, a01, a02; plus broken.jpg and the copy of a00
    assert manifest == returned
    assert manifest.details["last_run"]["failed"] == {}  # the engine answered every request
    assert manifest.details["last_run"]["requests"] == photos
    assert manifest.generated == photos + 2
    assert manifest.kept == 0
    assert manifest.rejected.pop("unreadable_image") == 1
    assert manifest.rejected.pop("near_duplicate_image") == 1
    assert sum(manifest.rejected.values()) == photos
    assert all(reason.startswith(ANSWER_REJECTIONS) for reason in manifest.rejected), manifest.rejected
    # Structured outputs work on the CPU build: even a random model's answers are JSON until the token limit.
    examples = manifest.details["last_run"]["rejection_examples"]
    assert examples and all(example["answer_start"].startswith("{") for example in examples.values()), examples
    assert manifest.model == tiny_dir.name and manifest.details["backend"] == "vllm"
    assert manifest.prompt_version.startswith("mme5_v1@")
    # nothing written as data; every photo accounted for by key
    assert all(path.read_text() == "" for path in out.glob("shard-*.jsonl"))
    keys = [json.loads(line)["key"] for path in out.glob("shard-*.keys") for line in path.read_text().splitlines()]
    assert sorted(keys) == sorted(path.name for path in folder.iterdir())
    assert not list(out.glob(".vllm-job-*")), "the engine's job folder is cleaned up"
