"""The distinct-scene sampler shared by the image-caption pairs, the text pairs, the task data and the
synthetic benchmark: the scenes it draws at a seed are pinned, so generated data stays the same."""

from __future__ import annotations

import random

import pytest

from unime.data_synth.scenes import DistinctScenes, scene_key
from unime.errors import ConfigError


def test_the_sampler_draws_the_pinned_scenes_at_a_seed_and_never_repeats_one() -> None:
    scenes = DistinctScenes(30, asked="30")
    rng = random.Random(0)
    keys = [scene_key(scenes.draw(rng, max_shapes=1)) for _ in range(30)]
    assert keys[:2] == [(("right", "circle", "orange"),), (("right", "square", "purple"),)]
    assert keys[-2:] == [(("bottom", "triangle", "yellow"),), (("top", "triangle", "blue"),)]
    assert len(set(keys)) == 30
    assert scenes.refusals_left == 100 * 30 + 10_000 - 7  # 7 repeats were drawn and refused on the way

    two = DistinctScenes(3, asked="3")
    rng = random.Random(0)
    assert [scene_key(two.draw(rng, max_shapes=2, min_shapes=2)) for _ in range(3)] == [
        (("bottom", "square", "purple"), ("right", "square", "red")),
        (("left", "triangle", "green"), ("right", "triangle", "green")),
        (("bottom", "triangle", "yellow"), ("center", "triangle", "orange")),
    ]


def test_a_repeat_is_refused_and_an_exhausted_scene_space_fails_naming_what_was_found() -> None:
    scenes = DistinctScenes(0, asked="1 + 1", detail=" of at most 1 shape(s)")
    assert scenes.accept(("a",)) and not scenes.accept(("a",))
    scenes.refusals_left = 0
    with pytest.raises(ConfigError, match=r"found only 1 distinct scenes of at most 1 shape\(s\); asked for 1 \+ 1"):
        scenes.accept(("a",))
