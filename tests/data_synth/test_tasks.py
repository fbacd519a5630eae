"""The procedural generator: reproducible, every task kind and modality, one-attribute negatives, clean splits."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest
from PIL import Image

from unime.data.dataset import load_examples
from unime.data_synth.manifest import Manifest, ShardedJsonlWriter
from unime.data_synth.scenes import Scene, Shape, describe, draw_scene, relation
from unime.data_synth.sharding import ALL, parse_shard
from unime.data_synth.tasks import (
    PROMPT_VERSION,
    RECIPES,
    TaskSynthConfig,
    plan,
    resume_settings,
    split_directory,
    to_row,
    write_task_examples,
)

CONFIG = TaskSynthConfig(train=54, held_out=27, negatives=3, seed=5, image_size=64, records_per_shard=20)
ALL_MODALITIES = {"T->I", "I->T", "IT->I", "IT->T", "I->I", "T->IT", "IT->IT"}


def differing_attribute(a: Scene, b: Scene) -> str | None:
    """Which single attribute turns scene a into scene b, judged from the two scene graphs alone; None when
    they differ in nothing or in more than one attribute."""
    if a.text != b.text:
        return "text" if set(a.shapes) == set(b.shapes) else None
    by_position_a = {s.position: s for s in a.shapes}
    by_position_b = {s.position: s for s in b.shapes}
    if len(a.shapes) != len(b.shapes):
        return None
    if set(by_position_a) == set(by_position_b):
        changed = [p for p in by_position_a if by_position_a[p] != by_position_b[p]]
        if len(changed) == 1:
            x, y = by_position_a[changed[0]], by_position_b[changed[0]]
            fields = [f for f in ("kind", "color", "size", "count") if getattr(x, f) != getattr(y, f)]
            return {"kind": "shape"}.get(fields[0], fields[0]) if len(fields) == 1 else None
        if len(changed) == 2:
            p, q = changed
            swapped = (
                by_position_a[p].appearance() == by_position_b[q].appearance()
                and by_position_a[q].appearance() == by_position_b[p].appearance()
            )
            return "relation" if swapped and relation(p, q) is not None else None
        return None
    moved_from = set(by_position_a) - set(by_position_b)
    moved_to = set(by_position_b) - set(by_position_a)
    if len(moved_from) == 1 and len(moved_to) == 1:
        x, y = by_position_a[moved_from.pop()], by_position_b[moved_to.pop()]
        return "position" if x.appearance() == y.appearance() else None
    return None


@pytest.fixture(scope="module")
def planned():
    return [item for item in plan(CONFIG)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_task_examples(tmp_path_factory.mktemp("tasks"), CONFIG)


def test_the_oracle_itself():
    a = Scene((Shape("circle", "red", "left", "small", 1), Shape("square", "blue", "right", "large", 2)), "STOP")
    assert (
        differing_attribute(a, Scene((a.shapes[0], Shape("square", "green", "right", "large", 2)), "STOP")) == "color"
    )
    assert differing_attribute(a, Scene((Shape("circle", "red", "top", "small", 1), a.shapes[1]), "STOP")) == "position"
    swapped = Scene((Shape("circle", "red", "right", "small", 1), Shape("square", "blue", "left", "large", 2)), "STOP")
    assert differing_attribute(a, swapped) == "relation"
    assert differing_attribute(a, Scene(a.shapes, "EXIT")) == "text"
    two_changes = Scene((Shape("circle", "blue", "left", "large", 1), a.shapes[1]), "STOP")
    assert differing_attribute(a, two_changes) is None


def test_the_original_scenes_are_unchanged():
    """Training recipes and README numbers depend on the original image-caption data: defaults keep it."""
    shapes = [Shape("circle", "red", "left"), Shape("triangle", "orange", "center")]
    assert describe(shapes) == "a red circle on the left and an orange triangle in the center"
    image = draw_scene(shapes[:1], size=112)
    assert image.getpixel((28, 56)) == (220, 40, 40)  # the red circle's centre, radius 0.16 * 112 = 17.9
    assert image.getpixel((28 + 17, 56)) == (220, 40, 40) and image.getpixel((28 + 19, 56)) == (255, 255, 255)


def test_every_task_kind_and_modality_combination_is_present(written):
    for split in ("train", "held_out"):
        counts = written.manifests[split].details["counts"]
        assert {key.split("/")[1] for key in counts if key.startswith("task/")} == {
            "classification",
            "vqa",
            "retrieval",
            "grounding",
        }
        assert {key.split("/")[1] for key in counts if key.startswith("modality/")} == ALL_MODALITIES
    attributes = {key.split("/")[1] for key in written.manifests["train"].details["counts"] if "negative_attr" in key}
    assert {"color", "shape", "position", "count", "relation"} <= attributes


def test_each_hard_negative_differs_from_its_positive_in_exactly_the_named_attribute(planned):
    seen_attributes: Counter = Counter()
    examples = [item.example for item in planned if item.example is not None]
    for example in examples:
        assert len(example.negatives) == CONFIG.negatives, example.key
        assert example.query.instruction, example.key
        contents = {example.positive.content()}
        for negative in example.negatives:
            assert differing_attribute(example.positive.scene, negative.side.scene) == negative.attribute, (
                example.key,
                example.recipe,
                negative,
            )
            # What a reader sees differs too, and no two candidates of a row are the same.
            assert negative.side.content() not in contents, (example.key, negative)
            contents.add(negative.side.content())
            seen_attributes[negative.attribute] += 1
    assert set(seen_attributes) == {"color", "shape", "size", "count", "position", "relation", "text"}


def test_rendered_negatives_show_the_change(written, planned):
    """On disk: a negative image is not the positive image, and a negative text is not the positive text."""
    directory = written.directories["train"]
    rows = [json.loads(line) for path in written.shard_paths("train") for line in path.read_text().splitlines()]
    assert len(rows) == CONFIG.train
    for row in rows:
        for negative in row["negatives"]:
            if "image" in negative:
                assert (directory / negative["image"]).read_bytes() != (
                    directory / row["positive"]["image"]
                ).read_bytes()
            else:
                assert negative.get("text") != row["positive"].get("text")
    examples, report = load_examples(written.shard_paths("train") + written.shard_paths("held_out"))
    assert len(examples) == CONFIG.train + CONFIG.held_out and report.skipped == 0


def test_no_scene_is_shared_between_splits(written, planned):
    scenes = {"train": set(), "held_out": set()}
    for item in planned:
        if item.example is not None:
            scenes[item.example.split].add(item.scene_key)
    assert len(scenes["train"]) == CONFIG.train and len(scenes["held_out"]) == CONFIG.held_out
    assert not scenes["train"] & scenes["held_out"]

    def query_images(split: str) -> set[str]:
        digests = set()
        for path in written.shard_paths(split):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                side = row["query"] if "image" in row["query"] else row["positive"]
                if "image" in side:
                    digests.add(hashlib.sha256((path.parent / side["image"]).read_bytes()).hexdigest())
        return digests

    assert not query_images("train") & query_images("held_out")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, written):
    again = write_task_examples(tmp_path / "again", CONFIG)
    for split in ("train", "held_out"):
        assert [p.read_bytes() for p in again.shard_paths(split)] == [
            p.read_bytes() for p in written.shard_paths(split)
        ]
        images = sorted((written.directories[split] / "images").iterdir())
        assert [p.read_bytes() for p in images] == [
            (again.directories[split] / "images" / p.name).read_bytes() for p in images
        ]
    other = write_task_examples(tmp_path / "other", TaskSynthConfig(**{**CONFIG.__dict__, "seed": 6}))
    assert other.shard_paths("train")[0].read_bytes() != written.shard_paths("train")[0].read_bytes()
    manifest = Manifest.load(written.directories["train"])
    assert (manifest.seed, manifest.model, manifest.prompt_version) == (5, "procedural", PROMPT_VERSION)
    assert manifest.kept == CONFIG.train and manifest.shards == [
        "shard-00000.jsonl",
        "shard-00001.jsonl",
        "shard-00002.jsonl",
    ]


def _rows(result, split: str) -> list[str]:
    return [line for path in result.shard_paths(split) for line in path.read_text().splitlines()]


def test_shards_split_the_job_exactly(tmp_path, written):
    parts = [write_task_examples(tmp_path, CONFIG, parse_shard(f"{i}/3")) for i in range(3)]
    for split in ("train", "held_out"):
        union = Counter(line for part in parts for line in _rows(part, split))
        assert union == Counter(_rows(written, split))
        assert split_directory(tmp_path, split, parse_shard("1/3")).name == "part-00001-of-00003"
        assert all(part.manifests[split].kept > 0 for part in parts)


def test_an_interrupted_run_resumes_to_the_same_output(tmp_path, written):
    """The state a SIGKILL leaves (flushed lines, a torn last line, no manifest update) is resumed exactly."""
    directory = split_directory(tmp_path, "train", ALL)
    (directory / "images").mkdir(parents=True)
    manifest = Manifest(
        prompt_version=PROMPT_VERSION, model="procedural", seed=CONFIG.seed, settings=resume_settings(CONFIG)
    )
    writer = ShardedJsonlWriter(directory, manifest=manifest, records_per_shard=CONFIG.records_per_shard)
    done = 0
    for item in plan(CONFIG):
        if item.example is not None and item.example.split == "train" and done < 31:
            writer.write(item.key, to_row(item.example, directory, CONFIG.image_size), signature=repr(item.scene_key))
            done += 1
    partial = next(directory.glob(".shard-*.partial"))
    with partial.open("a") as handle:
        handle.write('{"key": "train-00000')  # torn
    # The atomic writes it was in the middle of: a shard and an image, left half-written.
    (directory / ".shard-00001.jsonl.0123456789ab.tmp").write_text('{"query": ')
    (directory / "images" / ".0a1b2c.png.0123456789ab.tmp").write_bytes(b"\x89PNG")
    del writer  # killed: never closed

    resumed = write_task_examples(tmp_path, CONFIG)
    for split in ("train", "held_out"):
        assert _rows(resumed, split) == _rows(written, split)
        assert resumed.manifests[split].kept == written.manifests[split].kept
        assert resumed.manifests[split].generated == written.manifests[split].generated
    # The orphaned temporary files are gone; the images are those of an uninterrupted run.
    assert not list(directory.rglob("*.tmp"))
    assert sorted(p.name for p in (directory / "images").iterdir()) == sorted(
        p.name for p in (written.directories["train"] / "images").iterdir()
    )


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    from unime.cli import main

    small = ["--train", "6", "--held-out", "3"]
    assert main(["synth", "tasks", str(tmp_path), *small, "--negatives", "3"]) == 0
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    capsys.readouterr()
    # Other negatives and another held-out size into the same folder: refused, each difference named.
    assert main(["synth", "tasks", str(tmp_path), "--train", "6", "--held-out", "5", "--negatives", "2"]) == 2
    error = capsys.readouterr().err
    assert "negatives: was 3, now 2" in error and "held_out: was 3, now 5" in error
    assert str(tmp_path / "train" / "manifest.json") in error and "Traceback" not in error
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before  # nothing mixed in
    # The same settings resume (nothing to do); only the shard size may change.
    assert main(["synth", "tasks", str(tmp_path), *small, "--negatives", "3"]) == 0
    assert write_task_examples(tmp_path, TaskSynthConfig(train=6, held_out=3, records_per_shard=2)).manifests


@pytest.mark.parametrize("kind", ["tasks", "shapes", "text"])
def test_synth_into_a_file_is_an_error_naming_it(tmp_path, capsys, kind):
    from unime.cli import main

    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "below"):
        assert main(["synth", kind, str(out), "--train", "2", "--held-out", "1"]) == 2
        error = capsys.readouterr().err
        assert f"{out}: cannot write the output folder there" in error and f"{a_file}" in error
        assert "Traceback" not in error and "NotADirectoryError" not in error
    assert a_file.read_text() == "not a folder"


def test_the_recipes_cover_every_task_kind_and_modality():
    assert {recipe.task for recipe in RECIPES} == {"classification", "vqa", "retrieval", "grounding"}
    assert {recipe.modality for recipe in RECIPES} == ALL_MODALITIES


def test_grounding_crops_show_one_region(written):
    directory = written.directories["train"]
    crops = 0
    for path in written.shard_paths("train"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["source"] == "synth_grounding_it2i":
                for side in [row["positive"], *row["negatives"]]:
                    with Image.open(directory / side["image"]) as crop:
                        assert crop.size == (CONFIG.image_size // 4, CONFIG.image_size // 4)
                        assert len(crop.getcolors(4096)) > 1  # not blank: the shape is in it
                    crops += 1
    assert crops >= 4 * 6  # 54 rows in round robin over 9 recipes: 6 grounding rows of 1 + 3 crops


def test_synth_tasks_command(tmp_path, capsys):
    from unime.cli import main

    assert main(["synth", "tasks", str(tmp_path), "--train", "9", "--held-out", "9", "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    part = tmp_path / "train" / "part-00001-of-00002"
    assert str(part) in out and "rows in 1 shard(s)" in out
    manifest = Manifest.load(part)
    assert 0 < manifest.kept < 9 and manifest.details["shard"] == "1/2"
    assert main(["synth", "shapes", str(tmp_path / "shapes"), "--shard", "0/2"]) == 2
    assert "--shard applies to `unime synth tasks` only" in capsys.readouterr().err
