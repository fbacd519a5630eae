"""The procedural generator: drawn scenes turned into examples of MMEB's four task kinds and mmE5's modalities.

No model is needed. Each scene is a scene graph (`scenes.Scene`: shapes with colour, shape, size, count and
position, plus an optional word) drawn with PIL. A recipe turns it into one training example of a task kind
(classification, VQA, retrieval, grounding) and a modality combination (T->I, I->T, IT->I, IT->T, I->I, T->IT,
IT->IT), with an instruction on the query, and hard negatives that each change exactly one attribute of the
positive's scene (colour, shape, size, count, position, relation or the word), SugarCrepe-style.

Reproducible: scene `i` is drawn from its own generator seeded by (seed, i), so the output depends on the seed
alone, not on sharding, resuming or the order of the work. Splits share no scene: a scene graph already used
(by either split) is rejected as a near-duplicate and the next one takes its place. Output: one folder per
split, written by `manifest.ShardedJsonlWriter` (sharded JSONL, `manifest.json`, resumable).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from unime.atomic import atomic_write
from unime.data_synth.manifest import NEAR_DUPLICATE, Manifest, ShardedJsonlWriter, make_output_directory
from unime.data_synth.scenes import (
    POSITIONS,
    DistinctScenes,
    Scene,
    alter_scene,
    random_task_scene,
    related_pairs,
    where_phrase,
)
from unime.data_synth.sharding import ALL, Shard
from unime.errors import ConfigError

TaskKind = Literal["classification", "vqa", "retrieval", "grounding"]
Modality = Literal["T->I", "I->T", "IT->I", "IT->T", "I->I", "T->IT", "IT->IT"]
PROMPT_VERSION = "procedural-v1"
"""Bump when templates, instructions or recipes change what a seed produces."""

WHITE = (255, 255, 255)
# Light backgrounds for the "other photo of the same scene" sides (I->I, IT->IT): the match must come from the
# shapes, not from the canvas.
TINTS = ((246, 240, 228), (228, 240, 246), (236, 246, 228), (244, 232, 244))


@dataclass(frozen=True)
class Picture:
    """How to render a side's image: a scene, its background, and optionally only one position's region."""

    scene: Scene
    background: tuple[int, int, int] = WHITE
    crop: str | None = None
    """A position name: the picture is that position's region of the scene (grounding targets)."""

    def render(self, size: int):
        image = self.scene.draw(size=size, background=self.background)
        if self.crop is None:
            return image
        cx, cy = (c * size for c in POSITIONS[self.crop])
        half = size * 0.125  # half the distance between neighbouring positions: one shape's region
        return image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))

    def file_name(self) -> str:
        """Named by content: equal pictures share one file."""
        digest = hashlib.sha1(repr((self.scene.key(), self.background, self.crop)).encode()).hexdigest()[:20]
        return f"images/{digest}.png"


@dataclass(frozen=True)
class SynthSide:
    """One side of a generated example, with the scene it shows or describes (its ground truth)."""

    scene: Scene
    text: str | None = None
    picture: Picture | None = None
    instruction: str | None = None

    def content(self) -> tuple:
        """What a reader of the row sees; two sides with equal content are the same candidate."""
        picture = (
            None if self.picture is None else (self.picture.scene.key(), self.picture.background, self.picture.crop)
        )
        return (self.text, picture)


@dataclass(frozen=True)
class HardNegative:
    attribute: str
    """The one scene attribute in which this negative's scene differs from the positive's."""
    side: SynthSide


@dataclass(frozen=True)
class SynthExample:
    """A generated example before rendering: its sides, negatives, and where it comes from."""

    key: str
    """Idempotent record key, e.g. "train-0000042"."""
    split: str
    recipe: str
    task: TaskKind
    modality: Modality
    query: SynthSide
    positive: SynthSide
    negatives: tuple[HardNegative, ...]


@dataclass(frozen=True)
class Recipe:
    """How one (task kind, modality) example is made from a scene."""

    name: str
    task: TaskKind
    modality: Modality
    instruction: str
    min_shapes: int
    """Fewest shapes a scene needs for this recipe."""
    max_shapes: int
    build: Callable[[Scene, random.Random, int], tuple[SynthSide, SynthSide, list[HardNegative]]]
    """(scene, rng, negatives wanted) -> (query, positive, negatives)."""


@dataclass
class TaskSynthConfig:
    """Settings of the procedural generator (`unime synth tasks`)."""

    train: int = 200
    """Training examples (distinct scenes)."""
    held_out: int = 50
    """Held-out examples; no scene is shared with training."""
    negatives: int = 3
    """Hard negatives per example (fewer only where a question has fewer wrong answers)."""
    seed: int = 0
    image_size: int = 128
    """Side of the square images, in pixels (grounding crops are a quarter of it)."""
    max_shapes: int = 3
    """Most shapes per scene (recipes may ask for fewer or for at least 2)."""
    text_probability: float = 0.3
    """Chance that a scene shows a word (reading questions)."""
    recipes: tuple[str, ...] = ()
    """Recipe names to generate, round robin; empty: all of `RECIPES`."""
    records_per_shard: int = 1000
    """Rows per JSONL shard file."""


# ------------------------------------------------------------------------------------------------------------
# Negatives: alterations of the positive's scene, one attribute each
# ------------------------------------------------------------------------------------------------------------


def _one_attribute_negatives(
    scene: Scene,
    positive: SynthSide,
    attributes: tuple[str, ...],
    wanted: int,
    rng: random.Random,
    make_side: Callable[[Scene], SynthSide],
    target: int | None = None,
) -> list[HardNegative]:
    """Up to `wanted` negatives, each `make_side` of a one-attribute alteration, cycling over the attributes
    (in a shuffled order) so that one example mixes kinds of change; none equal to the positive or another."""
    order = list(attributes)
    rng.shuffle(order)
    seen = {positive.content()}
    negatives: list[HardNegative] = []
    failures = 0
    position = 0
    while len(negatives) < wanted and failures < 30 * max(wanted, 1):
        attribute = order[position % len(order)]
        position += 1
        altered = alter_scene(scene, attribute, rng, target)
        side = make_side(altered) if altered is not None else None
        if side is None or side.content() in seen:
            failures += 1
            continue
        seen.add(side.content())
        negatives.append(HardNegative(attribute, side))
    return negatives


def _object_attributes(scene: Scene) -> tuple[str, ...]:
    """The attributes that can change in this scene."""
    attributes = ["color", "shape", "size", "count", "position"]
    if related_pairs(scene):
        attributes.append("relation")
    if scene.text:
        attributes.append("text")
    return tuple(attributes)


def _image_side(scene: Scene, background=WHITE) -> SynthSide:
    return SynthSide(scene, picture=Picture(scene, background))


def _caption_side(scene: Scene) -> SynthSide:
    return SynthSide(scene, text=scene.describe())


# ------------------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------------------


def _classification(scene: Scene, rng: random.Random, k: int):
    """I->T: a one-shape image; the label names its count, size, colour and shape."""

    def label(s: Scene) -> SynthSide:
        return SynthSide(s, text=s.shapes[0].noun_phrase())

    query = SynthSide(scene, picture=Picture(scene), instruction=RECIPES_BY_NAME["classification_i2t"].instruction)
    positive = label(scene)
    negatives = _one_attribute_negatives(scene, positive, ("color", "shape", "size", "count"), k, rng, label)
    return query, positive, negatives


def _unique_reference(scene: Scene, index: int) -> str:
    """A phrase that picks shape `index` out of its scene: its look, plus its position when the look repeats."""
    shape = scene.shapes[index]
    phrase = f"{shape.color} {shape.kind}"
    if sum((s.color, s.kind) == (shape.color, shape.kind) for s in scene.shapes) > 1:
        phrase += f" {where_phrase(shape.position)}"
    return phrase


def _vqa(scene: Scene, rng: random.Random, k: int):
    """IT->T: an image and a question about one attribute of one shape (or the word); the answer is a text.
    Negatives are the answers to the same question about scenes that differ in that attribute."""
    target = rng.randrange(len(scene.shapes))
    shape = scene.shapes[target]
    where = where_phrase(shape.position)
    kinds = ["color", "shape", "count", "position"] + (["text"] if scene.text else [])
    kind = rng.choice(kinds)
    if kind == "color":
        question = f"What colour is the {'shape' if shape.count == 1 else 'group of shapes'} {where}?"

        def answer(s: Scene) -> str:
            return s.shapes[target].color
    elif kind == "shape":
        question = f"What shape is {where}?"

        def answer(s: Scene) -> str:
            return s.shapes[target].kind
    elif kind == "count":
        question = f"How many shapes are {where}?"

        def answer(s: Scene) -> str:
            return str(s.shapes[target].count)
    elif kind == "position":
        question = f"Where is the {_unique_reference(scene, target)}?"

        def answer(s: Scene) -> str:
            return where_phrase(s.shapes[target].position)
    else:
        question = "What word is written in the image?"

        def answer(s: Scene) -> str:
            return s.text or ""

    def answer_side(s: Scene) -> SynthSide:
        return SynthSide(s, text=answer(s))

    query = SynthSide(scene, text=question, picture=Picture(scene), instruction=RECIPES_BY_NAME["vqa_it2t"].instruction)
    positive = answer_side(scene)
    negatives = _one_attribute_negatives(scene, positive, (kind,), k, rng, answer_side, target)
    return query, positive, negatives


def _retrieval_t2i(scene: Scene, rng: random.Random, k: int):
    query = SynthSide(scene, text=scene.describe(), instruction=RECIPES_BY_NAME["retrieval_t2i"].instruction)
    positive = _image_side(scene)
    return query, positive, _one_attribute_negatives(scene, positive, _object_attributes(scene), k, rng, _image_side)


def _retrieval_i2t(scene: Scene, rng: random.Random, k: int):
    query = SynthSide(scene, picture=Picture(scene), instruction=RECIPES_BY_NAME["retrieval_i2t"].instruction)
    positive = _caption_side(scene)
    return query, positive, _one_attribute_negatives(scene, positive, _object_attributes(scene), k, rng, _caption_side)


def _edit_text(source: Scene, target: Scene, attribute: str) -> str:
    """The instruction that turns `source` into `target` (which differ in `attribute` only)."""
    if attribute == "text":
        return f'change the word to "{target.text}"'
    changed = [i for i, (a, b) in enumerate(zip(source.shapes, target.shapes, strict=True)) if a != b]
    after = target.shapes[changed[0]]
    reference = _unique_reference(source, changed[0])
    if attribute == "color":
        return f"make the {reference} {after.color}"
    if attribute == "shape":
        return f"turn the {reference} into a {after.kind}"
    if attribute == "size":
        return f"make the {reference} {after.size}"
    if attribute == "count":
        return f"show {after.count} of the {reference}"
    if attribute == "position":
        return f"move the {reference} {where_phrase(after.position)}"
    other = changed[1]
    return f"swap the {reference} and the {_unique_reference(source, other)}"


def _retrieval_it2i(scene: Scene, rng: random.Random, k: int):
    """IT->I, composed retrieval: an image and an edit; the positive is the edited scene. Its negatives are
    one-attribute alterations of the edited scene; the unedited source is one of them when it comes up."""
    attributes = _object_attributes(scene)
    for _ in range(20):
        edit = rng.choice(attributes)
        target = alter_scene(scene, edit, rng)
        if target is not None:
            break
    else:  # pragma: no cover - every scene has colour, which always has alternatives
        raise ConfigError("no edit applies to a scene")
    query = SynthSide(
        scene,
        text=_edit_text(scene, target, edit),
        picture=Picture(scene),
        instruction=RECIPES_BY_NAME["retrieval_it2i"].instruction,
    )
    positive = _image_side(target)
    negatives = [HardNegative(edit, _image_side(scene))][:k]
    seen = {positive.content(), negatives[0].side.content()} if negatives else {positive.content()}
    more = _one_attribute_negatives(target, positive, _object_attributes(target), k + 3, rng, _image_side)
    negatives += [n for n in more if n.side.content() not in seen][: k - len(negatives)]
    return query, positive, negatives


def _retrieval_i2i(scene: Scene, rng: random.Random, k: int):
    """I->I: another rendering of the same scene (another background) among re-renderings of altered scenes."""
    tint = rng.choice(TINTS)
    query = SynthSide(scene, picture=Picture(scene), instruction=RECIPES_BY_NAME["retrieval_i2i"].instruction)
    positive = _image_side(scene, tint)
    negatives = _one_attribute_negatives(
        scene, positive, _object_attributes(scene), k, rng, lambda s: _image_side(s, tint)
    )
    return query, positive, negatives


def _first_shape_title(s: Scene) -> str:
    return s.shapes[0].describe()


def _retrieval_t2it(scene: Scene, rng: random.Random, k: int):
    """T->IT: a question naming the whole scene; documents are an image with a title that names one shape
    only, so the rest must be read from the image."""

    def document(s: Scene) -> SynthSide:
        return SynthSide(s, text=_first_shape_title(s), picture=Picture(s))

    query = SynthSide(
        scene,
        text=f"Which picture shows {scene.describe()}?",
        instruction=RECIPES_BY_NAME["retrieval_t2it"].instruction,
    )
    positive = document(scene)
    return query, positive, _one_attribute_negatives(scene, positive, _object_attributes(scene), k, rng, document)


def _retrieval_it2it(scene: Scene, rng: random.Random, k: int):
    """IT->IT: an image with a one-shape title; documents are other renderings with full captions."""
    tint = rng.choice(TINTS)

    def document(s: Scene) -> SynthSide:
        return SynthSide(s, text=s.describe(), picture=Picture(s, tint))

    query = SynthSide(
        scene,
        text=_first_shape_title(scene),
        picture=Picture(scene),
        instruction=RECIPES_BY_NAME["retrieval_it2it"].instruction,
    )
    positive = document(scene)
    return query, positive, _one_attribute_negatives(scene, positive, _object_attributes(scene), k, rng, document)


def _grounding(scene: Scene, rng: random.Random, k: int):
    """IT->I: an image and a referring phrase; the positive is the region of that shape. Negatives are the same
    region of scenes where that shape differs in one attribute."""
    target = rng.randrange(len(scene.shapes))
    region = scene.shapes[target].position
    shape = scene.shapes[target]
    reference = f"the {shape.noun_phrase().split(' ', 1)[1]} {where_phrase(region)}"

    def crop(s: Scene) -> SynthSide:
        return SynthSide(s, picture=Picture(s, crop=region))

    query = SynthSide(
        scene, text=reference, picture=Picture(scene), instruction=RECIPES_BY_NAME["grounding_it2i"].instruction
    )
    positive = crop(scene)
    negatives = _one_attribute_negatives(scene, positive, ("color", "shape", "size", "count"), k, rng, crop, target)
    return query, positive, negatives


RECIPES: tuple[Recipe, ...] = (
    Recipe("classification_i2t", "classification", "I->T", "Identify the shapes in the image.", 1, 1, _classification),
    Recipe("vqa_it2t", "vqa", "IT->T", "Answer the question about the image.", 1, 2, _vqa),
    Recipe("retrieval_t2i", "retrieval", "T->I", "Find the image that matches the caption.", 1, 3, _retrieval_t2i),
    Recipe("retrieval_i2t", "retrieval", "I->T", "Find the caption that describes the image.", 1, 3, _retrieval_i2t),
    Recipe(
        "retrieval_it2i", "retrieval", "IT->I", "Find the image that shows this image after the change.", 1, 3,
        _retrieval_it2i,
    ),
    Recipe("retrieval_i2i", "retrieval", "I->I", "Find another picture of the same scene.", 1, 3, _retrieval_i2i),
    Recipe(
        "retrieval_t2it", "retrieval", "T->IT", "Find the titled picture that answers the question.", 1, 3,
        _retrieval_t2it,
    ),
    Recipe(
        "retrieval_it2it", "retrieval", "IT->IT", "Find the captioned picture of the same scene.", 1, 3,
        _retrieval_it2it,
    ),
    Recipe(
        "grounding_it2i", "grounding", "IT->I", "Select the region of the image that shows the described shape.", 2, 3,
        _grounding,
    ),
)  # fmt: skip
RECIPES_BY_NAME = {recipe.name: recipe for recipe in RECIPES}


# ------------------------------------------------------------------------------------------------------------
# Planning (cheap: no drawing) and writing
# ------------------------------------------------------------------------------------------------------------


@dataclass
class PlannedItem:
    """One step of the generation walk: an example, or a key rejected because its scene was already used."""

    key: str
    example: SynthExample | None = None
    rejected: str | None = None
    scene_key: tuple | None = None


def _selected_recipes(config: TaskSynthConfig) -> tuple[Recipe, ...]:
    if not config.recipes:
        return RECIPES
    unknown = sorted(set(config.recipes) - set(RECIPES_BY_NAME))
    if unknown:
        raise ConfigError(f"recipes: unknown {unknown}; expected some of {sorted(RECIPES_BY_NAME)}")
    return tuple(RECIPES_BY_NAME[name] for name in config.recipes)


def _check(config: TaskSynthConfig) -> None:
    if config.train < 0 or config.held_out < 0 or config.negatives < 0:
        raise ConfigError("train, held_out and negatives must be >= 0")
    if not 1 <= config.max_shapes <= len(POSITIONS):
        raise ConfigError(f"max_shapes must be in 1..{len(POSITIONS)}, got {config.max_shapes}")
    if config.image_size < 32:
        raise ConfigError(f"image_size must be >= 32 pixels, got {config.image_size}")


def plan(config: TaskSynthConfig) -> Iterator[PlannedItem]:
    """The whole generation walk, in order: `config.train` training examples, then `config.held_out` held-out
    ones, recipes in round robin within each split, interleaved with rejected near-duplicate scenes.

    The same on every machine: shards and resumed runs walk it all and keep the items they own.
    """
    _check(config)
    recipes = _selected_recipes(config)
    scenes = DistinctScenes(config.train + config.held_out, asked=f"{config.train} + {config.held_out}")
    index = 0
    for split, wanted in (("train", config.train), ("held_out", config.held_out)):
        made = 0
        while made < wanted:
            recipe = recipes[made % len(recipes)]
            key = f"{split}-{index:07d}"
            rng = random.Random(f"unime-procedural:{config.seed}:{index}")
            index += 1
            fewest = min(recipe.min_shapes, config.max_shapes)
            most = max(min(recipe.max_shapes, config.max_shapes), fewest)
            scene = random_task_scene(rng, min_shapes=fewest, max_shapes=most, text_probability=config.text_probability)
            if not scenes.accept(scene.key()):  # a repeat stays in the walk as a rejected item, counted in the manifest
                yield PlannedItem(key, rejected=NEAR_DUPLICATE, scene_key=scene.key())
                continue
            query, positive, negatives = recipe.build(scene, rng, config.negatives)
            example = SynthExample(
                key, split, recipe.name, recipe.task, recipe.modality, query, positive, tuple(negatives)
            )
            yield PlannedItem(key, example=example, scene_key=scene.key())
            made += 1


def _save_png_atomic(image, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")


def _row_side(side: SynthSide, directory: Path, image_size: int) -> dict:
    row: dict = {}
    if side.text is not None:
        row["text"] = side.text
    if side.picture is not None:
        name = side.picture.file_name()
        path = directory / name
        if not path.is_file():
            _save_png_atomic(side.picture.render(image_size), path)
        row["image"] = name
    if side.instruction:
        row["instruction"] = side.instruction
    return row


def to_row(example: SynthExample, directory: Path, image_size: int) -> dict:
    """The training row of `example` (unime.data.schema), drawing its images under `directory/images/`."""
    return {
        "query": _row_side(example.query, directory, image_size),
        "positive": _row_side(example.positive, directory, image_size),
        "negatives": [_row_side(n.side, directory, image_size) for n in example.negatives],
        "source": f"synth_{example.recipe}",
    }


@dataclass
class TaskSynthResult:
    """Where each split went and what its manifest says."""

    directories: dict[str, Path] = field(default_factory=dict)
    manifests: dict[str, Manifest] = field(default_factory=dict)

    def shard_paths(self, split: str) -> list[Path]:
        return [self.directories[split] / name for name in self.manifests[split].shards]


def split_directory(out_dir: str | Path, split: str, shard: Shard = ALL) -> Path:
    """`out_dir/<split>`, or `out_dir/<split>/part-<i>-of-<N>` for one shard of a sharded job."""
    directory = Path(out_dir) / split
    return directory if shard.count == 1 else directory / f"part-{shard.index:05d}-of-{shard.count:05d}"


def resume_settings(config: TaskSynthConfig) -> dict:
    """The settings an output folder is resumed only with, besides the manifest's seed: all that decides the rows
    (`records_per_shard` only cuts them into files). Split sizes count too: held-out keys follow the training ones
    in one walk."""
    settings = asdict(config)
    del settings["records_per_shard"], settings["seed"]
    return settings


def write_task_examples(
    out_dir: str | Path, config: TaskSynthConfig | None = None, shard: Shard = ALL
) -> TaskSynthResult:
    """Generate, draw and write the examples this shard owns, resuming whatever an earlier run left.

    Returns each split's folder (`out_dir/train`, `out_dir/held_out`; one `part-i-of-N` below them per shard)
    and its manifest (counts per task, modality and negative attribute in `details`).
    """
    config = config or TaskSynthConfig()
    make_output_directory(out_dir)  # first, so that a bad path is named as given
    result = TaskSynthResult()
    writers: dict[str, ShardedJsonlWriter] = {}
    tallies: dict[str, Counter] = {}
    try:
        for split in ("train", "held_out"):
            directory = split_directory(out_dir, split, shard)
            make_output_directory(directory / "images")
            manifest = Manifest(
                prompt_version=PROMPT_VERSION, model="procedural", seed=config.seed, settings=resume_settings(config)
            )
            writers[split] = ShardedJsonlWriter(
                directory, manifest=manifest, records_per_shard=config.records_per_shard
            )
            result.directories[split] = directory
            tallies[split] = Counter()
        for item in plan(config):
            split = "train" if item.key.startswith("train-") else "held_out"
            if not shard.owns(item.key):
                continue
            writer = writers[split]
            if item.example is None:
                writer.reject(item.key, item.rejected or NEAR_DUPLICATE)
                continue
            example = item.example
            tally = tallies[split]
            tally[f"recipe/{example.recipe}"] += 1
            tally[f"task/{example.task}"] += 1
            tally[f"modality/{example.modality}"] += 1
            for negative in example.negatives:
                tally[f"negative_attribute/{negative.attribute}"] += 1
            if item.key in writer:
                continue
            writer.write(item.key, to_row(example, writer.directory, config.image_size), signature=repr(item.scene_key))
    finally:
        for split, writer in writers.items():
            writer.manifest.details = {
                "generator": "procedural",
                "shard": str(shard),
                "config": asdict(config),
                "counts": dict(sorted(tallies[split].items())),
            }
            result.manifests[split] = writer.close()
    return result


def run_synth_tasks(
    out_dir: str | Path, shard_spec: str | None, *, max_shapes: int | None = None, **settings: int
) -> int:
    """`unime synth tasks`: generate, print where each split went and its counts."""
    from unime.data_synth.sharding import parse_shard

    config = TaskSynthConfig(**settings, **({"max_shapes": max_shapes} if max_shapes else {}))
    result = write_task_examples(out_dir, config, parse_shard(shard_spec))
    for split, manifest in result.manifests.items():
        rejected = ", ".join(f"{count} {reason}" for reason, count in manifest.rejected.items()) or "none"
        where = result.directories[split]
        print(f"{split}: {where} ({manifest.kept} rows in {len(manifest.shards)} shard(s); rejected: {rejected})")
    return 0
