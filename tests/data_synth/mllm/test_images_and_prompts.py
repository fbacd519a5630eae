"""Photo listing, near-duplicate photos, the second view, plans and versioned prompts."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from PIL import Image

from unime.atomic import write_jsonl_atomic
from unime.data_synth.mllm.images import difference_hash, find_near_duplicates, list_photos, open_photo, second_view
from unime.data_synth.mllm.plan import COMBINATIONS, TASKS, PlanChoices, suggest_plan
from unime.data_synth.mllm.prompting import PROMPT_VERSION, load_prompt
from unime.data_synth.mllm.vllm_backend import _devices_of
from unime.data_synth.mllm.vllm_worker import END_OF_REQUESTS, chunk_name, rank_slice, staged_chunks
from unime.errors import ConfigError

from .conftest import make_photo_folder


def test_listing_finds_images_recursively_in_key_order(tmp_path, real_photo_paths):
    folder = make_photo_folder(tmp_path / "photos", real_photo_paths)
    (folder / "sub").mkdir()
    Image.new("RGB", (30, 30)).save(folder / "sub" / "x.webp")
    (folder / "notes.txt").write_text("not an image")
    keys = [photo.key for photo in list_photos(folder)]
    assert keys == ["a00.jpg", "a01.jpg", "a02.jpg", "broken.jpg", "sub/x.webp", "zz-copy-of-a00.png"]
    with pytest.raises(OSError, match="broken.jpg"):
        open_photo(folder / "broken.jpg")


def test_near_duplicate_photos_are_found_and_distinct_ones_are_not(tmp_path, ten_photo_paths):
    images = {f"p{i}": open_photo(path) for i, path in enumerate(ten_photo_paths)}
    images["p0-small"] = images["p0"].resize((120, 120))
    images["p3-half"] = images["p3"].reduce(2)
    hashes = {key: difference_hash(image) for key, image in images.items()}
    assert find_near_duplicates(hashes, 4) == {"p0-small": "p0", "p3-half": "p3"}
    assert find_near_duplicates(hashes, -1) == {}


def test_banded_lookup_equals_comparing_every_pair():
    rng = random.Random(0)
    bases = [rng.getrandbits(64) for _ in range(40)]
    hashes = {}
    for i, base in enumerate(bases):
        hashes[f"k{i:03d}"] = base
        for j in range(3):  # variants with 0-6 flipped bits
            flipped = base
            for bit in rng.sample(range(64), rng.randint(0, 6)):
                flipped ^= 1 << bit
            hashes[f"k{i:03d}-{j}"] = flipped
    for distance in (0, 2, 4, 7):
        expected, originals = {}, []
        for key in sorted(hashes):
            matches = [o for o in originals if (hashes[o] ^ hashes[key]).bit_count() <= distance]
            if matches:
                expected[key] = min(matches)
            else:
                originals.append(key)
        assert find_near_duplicates(hashes, distance) == expected


def test_the_second_view_is_a_mirrored_central_crop(real_photo_paths):
    image = open_photo(real_photo_paths[0])
    view = second_view(image)
    assert view.size == (200, 200)  # 250 px photos, 10% off each side
    assert view.getpixel((0, 0)) == image.getpixel((224, 25))


def test_plans_are_stable_per_key_and_cover_the_choices():
    choices = PlanChoices()
    assert suggest_plan("a.jpg", 3, choices) == suggest_plan("a.jpg", 3, choices)
    plans = [suggest_plan(f"photo-{i}.jpg", 0, choices) for i in range(400)]
    assert set(Counter(plan.combination for plan in plans)) == set(COMBINATIONS)
    assert set(Counter(plan.task for plan in plans)) == set(TASKS)
    assert len({suggest_plan("a.jpg", seed, choices) for seed in range(20)}) > 1


def test_plan_choices_are_validated():
    with pytest.raises(ConfigError, match="combinations"):
        PlanChoices(combinations=("T->I", "T->T"))
    with pytest.raises(ConfigError, match="tasks"):
        PlanChoices(tasks=())


def test_the_packaged_prompt_renders_every_placeholder():
    prompt = load_prompt(PROMPT_VERSION)
    assert prompt.version.startswith(f"{PROMPT_VERSION}@")
    plan = suggest_plan("a.jpg", 0, PlanChoices())
    text = prompt.render(plan, PlanChoices())
    assert "$" not in text
    assert f"task = {plan.task}, combination = {plan.combination}, language = {plan.language}." in text


def test_a_prompt_file_is_versioned_by_its_content(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Describe the photo. Use $task and $combination in $language.")
    first = load_prompt(str(path))
    path.write_text("Describe the photo carefully. Use $task and $combination in $language.")
    second = load_prompt(str(path))
    assert first.version.startswith("mine@") and second.version.startswith("mine@")
    assert first.version != second.version
    path.write_text("Use $task and $colour.")
    with pytest.raises(ConfigError, match="placeholder"):
        load_prompt(str(path))
    with pytest.raises(ConfigError, match="packaged prompts"):
        load_prompt("no_such_prompt")


def test_data_parallel_ranks_partition_the_requests():
    items = list(range(11))
    slices = [rank_slice(items, rank, 3) for rank in range(3)]
    assert sorted(sum(slices, [])) == items
    assert all(len(s) in (3, 4) for s in slices)


def test_engines_read_staged_chunks_in_order_until_the_end_marker(tmp_path):
    def stage() -> None:
        for index in range(3):
            time.sleep(0.05)
            write_jsonl_atomic(tmp_path / chunk_name(index), [{"key": f"k{index}-{i}"} for i in range(2)])
        (tmp_path / END_OF_REQUESTS).touch()

    writer = threading.Thread(target=stage)
    writer.start()
    chunks = list(staged_chunks(tmp_path, poll_s=0.01))
    writer.join()
    assert [[row["key"] for row in chunk] for chunk in chunks] == [[f"k{i}-0", f"k{i}-1"] for i in range(3)]


def test_data_parallel_engines_get_disjoint_devices():
    assert [_devices_of(rank, 2, {}) for rank in range(2)] == [["0", "1"], ["2", "3"]]
    restricted = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert [_devices_of(rank, 1, restricted) for rank in range(4)] == [["4"], ["5"], ["6"], ["7"]]
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        _devices_of(2, 2, restricted)
