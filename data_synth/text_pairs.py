"""Sentence pairs about drawn scenes: a description and a paraphrase of it, for stage-1 text distillation.

The embedded default's text corpus, generated (no download): each scene is described twice in different
words, so a text embedder (the teacher) places the two close, and scenes that share attributes in between.
Splits never share a scene.
"""

from __future__ import annotations

import random
from pathlib import Path

from unime.atomic import write_jsonl_atomic
from unime.data_synth.manifest import make_output_directory
from unime.data_synth.scenes import DistinctScenes, Shape

_WHERE = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top edge"),
    "bottom": ("at the bottom", "near the bottom edge"),
    "center": ("in the center", "in the middle"),
}

# Ways to say "a <colour> <shape> <where>"; a pair takes two different ones.
_TEMPLATES = (
    "a {color} {kind} {where}",
    "{where_cap} there is a {color} {kind}",
    "one {color} {kind} sits {where2}",
    "you can see a {kind} in {color} {where2}",
    "the picture shows a {color} {kind} {where}",
)


def _phrase(shape: Shape, template: str) -> str:
    where, where2 = _WHERE[shape.position]
    text = template.format(color=shape.color, kind=shape.kind, where=where, where2=where2, where_cap=where.capitalize())
    return text.replace(" a orange", " an orange").replace("a orange", "an orange")


def describe_in_words(shapes: list[Shape], template: str) -> str:
    return ", and ".join(_phrase(shape, template) for shape in shapes)


def write_text_pairs(
    directory: str | Path, *, train: int = 400, held_out: int = 100, seed: int = 0, max_shapes: int = 2
) -> dict[str, Path]:
    """Write `train.jsonl` and `held_out.jsonl` of text pairs (query: a description, positive: a paraphrase)."""
    directory = Path(directory)
    make_output_directory(directory)
    rng = random.Random(seed)
    scenes = DistinctScenes(train + held_out, asked=f"{train} + {held_out}")
    paths = {"train": directory / "train.jsonl", "held_out": directory / "held_out.jsonl"}
    for split, count in (("train", train), ("held_out", held_out)):
        rows = []
        while len(rows) < count:
            shapes = scenes.draw(rng, max_shapes)
            first, second = rng.sample(_TEMPLATES, 2)
            rows.append(
                {
                    "query": {"text": describe_in_words(shapes, first)},
                    "positive": {"text": describe_in_words(shapes, second)},
                    "source": "shape_paraphrases",
                }
            )
        write_jsonl_atomic(paths[split], rows)
    return paths
