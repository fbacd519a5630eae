"""Image-caption training data drawn in code: image queries, caption positives, one-attribute hard negatives.

Each row follows unime's training schema (`unime.data.schema`): the query is a drawn scene, the positive its
caption, the negatives captions of the same scene with one attribute (colour, shape or position) changed.
Splits never share a scene, so held-out metrics measure generalisation to unseen compositions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from unime.atomic import write_jsonl_atomic
from unime.data_synth.manifest import make_output_directory
from unime.data_synth.scenes import (
    DistinctScenes,
    all_one_attribute_alterations,
    alter_one_attribute,
    describe,
    draw_scene,
)

QUERY_INSTRUCTION = "Find the caption that describes this image."


def write_image_caption_pairs(
    directory: str | Path,
    *,
    train: int = 60,
    held_out: int = 30,
    negatives: int = 3,
    seed: int = 0,
    image_size: int = 112,
    max_shapes: int = 1,
) -> dict[str, Path]:
    """Write `train.jsonl`, `held_out.jsonl` and their images under `directory`; returns the two JSONL paths.

    Training rows carry `negatives` random one-attribute alterations; held-out rows carry all of them.

    Idempotent: an existing, complete output (same arguments) is reused.
    """
    directory = make_output_directory(directory)  # first, so that a bad path is named as given
    manifest = directory / "manifest.json"
    arguments = {
        "train": train,
        "held_out": held_out,
        "negatives": negatives,
        "seed": seed,
        "image_size": image_size,
        "max_shapes": max_shapes,
    }
    paths = {"train": directory / "train.jsonl", "held_out": directory / "held_out.jsonl"}
    if manifest.is_file() and json.loads(manifest.read_text()) == arguments:
        return paths

    rng = random.Random(seed)
    detail = f" of at most {max_shapes} shape(s)"
    scenes = DistinctScenes(train + held_out, asked=f"{train} + {held_out}", detail=detail)
    make_output_directory(directory / "images")
    for split, count in (("train", train), ("held_out", held_out)):
        rows = []
        while len(rows) < count:
            shapes = scenes.draw(rng, max_shapes)
            image_name = f"images/{split}-{len(rows):05d}.png"
            draw_scene(shapes, size=image_size).save(directory / image_name)
            if split == "held_out":
                # Every one-attribute alteration: discrimination accuracy is then measured on all of them.
                hard = [describe(altered) for altered in all_one_attribute_alterations(shapes)]
            else:
                hard = []
                while len(hard) < negatives:
                    caption = describe(alter_one_attribute(shapes, rng))
                    if caption != describe(shapes) and caption not in hard:
                        hard.append(caption)
            rows.append(
                {
                    "query": {"image": image_name, "instruction": QUERY_INSTRUCTION},
                    "positive": {"text": describe(shapes)},
                    "negatives": [{"text": caption} for caption in hard],
                    "source": "shapes_i2t",
                }
            )
        write_jsonl_atomic(paths[split], rows)
    manifest.write_text(json.dumps(arguments))
    return paths
