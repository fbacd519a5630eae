"""Shared test set-up: offline, one torch thread, tiny models built once per session."""

from __future__ import annotations

import os

# Before torch or transformers are imported: nothing may be fetched, and two threads on a 2-core machine
# under load made steps 5-30x slower.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from unime.data_synth.marker_pages import write_marker_pages  # noqa: E402
from unime.data_synth.scenes import describe, draw_scene, random_scene  # noqa: E402


@pytest.fixture(scope="session")
def tiny_embedders():
    """Tiny embedders by backbone name, each built once per session (build with `get`)."""
    import unime

    cache: dict[str, unime.Embedder] = {}

    def get(backbone: str = "qwen2_vl"):
        if backbone not in cache:
            cache[backbone] = unime.build_tiny(backbone, seed=0)
        return cache[backbone]

    return get


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_embedders) -> Path:
    """A saved tiny Qwen2-VL model directory with a query instruction set."""
    import copy

    import unime

    base = tiny_embedders("qwen2_vl")
    config = copy.deepcopy(base.config)
    config.prompts.query_instruction = "Find the image that matches the caption."
    embedder = unime.Embedder(base.model, copy.deepcopy(base.processor), config)
    directory = tmp_path_factory.mktemp("models") / "tiny-qwen2-vl"
    embedder.save(directory)
    return directory


@pytest.fixture(scope="session")
def scenes():
    """Six drawn scenes and their captions (fixed seed)."""
    rng = random.Random(7)
    shapes = [random_scene(rng) for _ in range(6)]
    return [draw_scene(scene) for scene in shapes], [describe(scene) for scene in shapes]


@pytest.fixture(scope="session")
def real_photo_paths() -> list[Path]:
    """Real 250x250 JPEG photos shipped by the conformal-clip-data package."""
    from conformal_clip_data import nominal_dir

    photos = sorted(nominal_dir().glob("*.jpg"))[:3]
    assert len(photos) == 3, "conformal-clip-data ships its photos as .jpg files"
    return photos


def mixed_inputs(images, captions, photos=()) -> list:
    """Texts of several lengths, PIL images of several sizes, text+image dicts and photo paths, interleaved."""
    items: list = [
        captions[0],
        images[0],
        {"text": captions[1], "image": images[1].resize((80, 60))},
        "a much longer text " * 6 + captions[2],
        images[2].resize((140, 100)),
        captions[3],
        {"image": images[3], "text": "which shape is on the left?"},
    ]
    items[3:3] = list(photos)
    return items


@pytest.fixture(scope="session")
def marker_pages(tmp_path_factory) -> dict[str, Path]:
    """Drawn marker pages (`unime.data_synth.marker_pages`), seed 0: 64 training rows and 80 held-out ones."""
    directory = tmp_path_factory.mktemp("marker_pages")
    return {
        "train": write_marker_pages(directory, "train", 64, seed=0),
        "held_out": write_marker_pages(directory, "held_out", 80, seed=0),
    }


@pytest.fixture(scope="session")
def stage1_text_pairs(tmp_path_factory) -> dict[str, Path]:
    """The embedded default's paraphrase corpus (400 training pairs, 100 held out)."""
    from unime.data_synth.text_pairs import write_text_pairs

    return write_text_pairs(tmp_path_factory.mktemp("text"), seed=0)


@pytest.fixture(scope="session")
def stage1_run(stage1_text_pairs, tmp_path_factory) -> tuple[Path, Path]:
    """The stage-1 recipe on the paraphrase corpus with the offline MiniLM teacher; (final dir, cache dir).

    Trained once per session: the stage-1 tests check it, stage 2 and the rerankers start from it.
    """
    from tests.train.recipes import RECIPES, recipe_main

    out = tmp_path_factory.mktemp("stage1")
    cache = out / "teacher_cache"
    final = recipe_main()(
        [
            "--config",
            str(RECIPES / "configs" / "stage1_text_distill.yaml"),
            f"data.train_files=[{stage1_text_pairs['train']}]",
            f"data.eval_files=[{stage1_text_pairs['held_out']}]",
            f"output_dir={out}",
            f"distill.cache_dir={cache}",
            "log_with=[]",
            "save_every=0",
        ]
    )
    return final, cache


@pytest.fixture(scope="module")
def ray_local(request):
    """A real local Ray cluster of 2 CPUs, started once for the test module that asks for it and shut down after it.
    The module's own classes (encoder factories that fail on purpose) reach the workers by value: tests/ is not
    importable there."""
    import ray  # heavy optional dependency (the `ray` extra)

    ray.cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


SLOW_FIXTURES = frozenset({"server", "vllm_server", "rank_results", "stage1_run", "ray_local"})
"""Fixtures that start a server subprocess, a vLLM engine, ranks in other processes or a training run: every test
using one is marked `slow`, so that `make test-fast` leaves it out."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
