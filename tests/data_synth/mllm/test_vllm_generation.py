"""The generator on the real vLLM engine (CPU build) with a tiny Qwen2-VL: every junk answer is rejected with
a reason, the corrupt photo is counted, nothing is written as data, and the engine answers every request.

One engine start, in the backend's child process (the engine never runs in the pytest process; the child is
judged by the results it writes, not by its exit code).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import ray

from unime.data.dataset import load_examples
from unime.data_synth.manifest import Manifest
from unime.data_synth.mllm.answer import parse_page_answer
from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset
from unime.data_synth.mllm.plan import PlanChoices
from unime.data_synth.mllm.ray_generation import GenerationWorker, RayBackend
from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig
from unime.data_synth.pages import draw_page, random_page
from unime.ray_engine import RaySettings

from .conftest import make_photo_folder
from .test_openai_generation import data_files

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


PAGES = 3
K = 2
QUERY_CHARS = 16
PAGE_MAX_TOKENS = 320
"""Above the longest answer the schema allows: (5 + 3 x K) x QUERY_CHARS characters of text plus the JSON."""


def draw_page_folder(folder: Path) -> Path:
    """`PAGES` document pages drawn by the procedural page generator, as PNG files."""
    folder.mkdir(parents=True)
    rng = random.Random(11)
    for index in range(PAGES):
        draw_page(random_page(rng, f"vllm-{index}")).save(folder / f"page-{index}.png")
    return folder


PAGES_BACKEND = VllmBackendConfig(
    max_tokens=PAGE_MAX_TOKENS,
    max_model_len=2048,
    batch_size=PAGES,
    temperature=1.0,
    enforce_eager=True,
    single_process=True,
)
PAGES_SEED = 3
CHOICES = PlanChoices(languages=("English",))


def pages_config(folder: Path, out: Path) -> GenerateConfig:
    return GenerateConfig(
        image_dir=str(folder),
        out_dir=str(out),
        mode="pages",
        queries_per_page=K,
        max_query_chars=QUERY_CHARS,
        choices=CHOICES,
        max_image_side=112,
        seed=PAGES_SEED,
    )


@pytest.fixture(scope="module")
def pages_run(tiny_dir, tmp_path_factory) -> tuple[Path, Path, Manifest]:
    """The pages mode on drawn pages with the local vLLM backend: the page folder, the output folder, the manifest."""
    root = tmp_path_factory.mktemp("vllm-pages")
    folder, out = draw_page_folder(root / "pages"), root / "out"
    backend = VllmBackend(replace(PAGES_BACKEND, model=str(tiny_dir)), work_dir=out, seed=PAGES_SEED)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setenv("VLLM_CACHE_ROOT", str(root / "vllm-cache"))
        manifest = generate_dataset(pages_config(folder, out), backend, backend_kind="vllm")
    print("engine exit codes:", backend.returncodes, "last run:", json.dumps(manifest.details["last_run"])[:2000])
    return folder, out, manifest


def test_pages_mode_on_vllm_writes_exactly_k_queries_per_page(pages_run):
    """Guided decoding (xgrammar in vllm-cpu 0.32) holds a random tiny model to the pages schema: exactly K queries
    (minItems = maxItems), each with its fact, every text bounded (maxLength), so every answer parses and each page
    becomes K loadable rows (text query -> the page image). Without the bounds each answer ran to max_tokens inside
    its first string and was rejected as truncated_answer."""
    _, out, manifest = pages_run
    assert manifest.details["last_run"]["failed"] == {}
    assert manifest.details["last_run"]["requests"] == PAGES
    assert manifest.rejected == {}, manifest.details["last_run"]["rejection_examples"]
    assert manifest.kept == K * PAGES
    examples, report = load_examples(sorted(out.glob("shard-*.jsonl")))
    assert report.kept == K * PAGES and report.skipped == 0
    assert {example.positive.image.name for example in examples} == {f"page-{i}.png" for i in range(PAGES)}
    assert all(0 < len(example.query.text) <= QUERY_CHARS and example.query.image is None for example in examples)
    # each page's saved answer is a valid pages answer with exactly K queries
    facts = [json.loads(path.read_text()) for path in (out / "facts").glob("*.json")]
    assert len(facts) == PAGES
    for fact in facts:
        del fact["key"]
        assert len(parse_page_answer(json.dumps(fact), CHOICES, K, max_query_chars=QUERY_CHARS).queries) == K


def test_a_vllm_engine_in_a_ray_actor_writes_the_local_rows(pages_run, tiny_dir, tmp_path):
    """`engine: ray` with the vLLM backend: the engine starts once in the pool's actor and writes, byte for byte,
    what the local engine wrote (each request seeded from the run's seed and its key)."""
    folder, local_out, local = pages_run
    out = folder.parent / "out-ray"  # beside the local output: rows name the pages by the same relative path
    worker = GenerationWorker("vllm", vllm=replace(PAGES_BACKEND, model=str(tiny_dir)), seed=PAGES_SEED)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})  # the actor's environment
    try:
        backend = RayBackend(worker, RaySettings(num_workers=1, batch_size=PAGES, max_restarts=0))
        manifest = generate_dataset(pages_config(folder, out), backend, backend_kind="vllm")
    finally:
        ray.shutdown()
    assert manifest.details["last_run"]["engine"] == "ray" and manifest.details["last_run"]["failed"] == {}
    assert manifest.kept == local.kept == K * PAGES
    assert data_files(out) == data_files(local_out)  # shards, key files and saved answers
