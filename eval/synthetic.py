"""The embedded default benchmark: drawn scenes in MMEB's eval layout, plus SugarCrepe and retrieval sets.

`write_synthetic_benchmark(dir, seed=...)` writes, with no model and no download:

    <dir>/categories.json                 meta-task and IND/OOD split of each dataset below
    <dir>/images/                         every drawn scene and crop (PNG), named by content
    <dir>/Synthetic-Color/test-00000.parquet      classification: image -> its shape's colour among 6 names
    <dir>/Synthetic-Shape/test-00000.parquet      classification: image -> its shape among 3 names
    <dir>/Synthetic-VQA/test-00000.parquet        VQA: image + question (colour / shape / place) -> the answer
                                                  among every answer of that question type
    <dir>/Synthetic-T2I/test-00000.parquet        retrieval: caption -> its image among `candidates` images
    <dir>/Synthetic-I2T/test-00000.parquet        retrieval: image -> its caption among `candidates` captions
    <dir>/Synthetic-Grounding/test-00000.parquet  grounding: image + "the <colour> <shape>" -> the crop around
                                                  that shape among crops of the other shapes and other scenes
    <dir>/sugarcrepe/{replace_color,replace_kind,replace_position}.json (+ images/)
                                                  compositional: image, its caption, and the caption with one
                                                  attribute of one shape changed (category = the attribute)
    <dir>/retrieval/test.json (+ images/)         Flickr30K-style retrieval: each image with two captions
    <dir>/visdoc/{corpus,queries,qrels}.parquet   MMEB-V2 visdoc / ViDoRe (BEIR) layout: each query's scene
                                                  drawn large (relevance 2) and small (1), images as bytes

Every MMEB file has exactly the columns of `TIGER-Lab/MMEB-eval` (`qry_text`, `qry_img_path`, `tgt_text`,
`tgt_img_path`; positive first; `<|image_1|>` placeholders; image paths relative to `<dir>/images`), so the
harness reads it as it reads the real benchmark. Retrieval and grounding candidate lists are drawn from a
shared pool of `pool` scenes, so candidates repeat across queries as MMEB's do.

What it holds: scenes drawn from their own random stream (seeded by `seed` but distinct from the stream
`unime synth shapes` uses for training data with the same seed). With one shape per scene only 90 scenes
exist, so small-scene tasks (colour and shape classification) necessarily meet scenes that training data
may also contain; VQA, retrieval, grounding and SugarCrepe use two-shape scenes (3,330 exist), where overlap
with a training set of a few hundred scenes is rare but not excluded. Synthetic-I2T has the form of
`unime synth shapes` training rows (image -> caption) and is marked in-distribution (IND); the others are
out-of-distribution (OOD) tasks for a model trained on that data alone.

The output is written into a staging folder and renamed into place; an existing, complete output written with
the same arguments is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from unime.atomic import write_json_atomic
from unime.data_synth.scenes import (
    ATTRIBUTES,
    COLORS,
    POSITIONS,
    SHAPES,
    DistinctScenes,
    Shape,
    all_one_attribute_alterations,
    describe,
    draw_scene,
)

MANIFEST = "manifest.json"
CATEGORIES = {
    "Synthetic-Color": {"category": "classification", "split": "OOD"},
    "Synthetic-Shape": {"category": "classification", "split": "OOD"},
    "Synthetic-VQA": {"category": "vqa", "split": "OOD"},
    "Synthetic-T2I": {"category": "retrieval", "split": "OOD"},
    "Synthetic-I2T": {"category": "retrieval", "split": "IND"},
    "Synthetic-Grounding": {"category": "grounding", "split": "OOD"},
}
ATTRIBUTE_NAMES = {"color": "color", "kind": "shape", "position": "position"}


class _ImageStore:
    """Writes each distinct image once, named by a hash of its pixels, and returns its relative path."""

    def __init__(self, folder: Path, prefix: str = ""):
        self.folder = folder
        self.prefix = prefix
        folder.mkdir(parents=True, exist_ok=True)
        self._written: set[str] = set()

    def add(self, image: Image.Image) -> str:
        name = hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()[:16] + ".png"
        if name not in self._written:
            image.save(self.folder / name)
            self._written.add(name)
        return self.prefix + name


def _distinct_scenes(rng: random.Random, count: int, max_shapes: int, min_shapes: int = 1) -> list[list[Shape]]:
    scenes = DistinctScenes(count, asked=str(count), detail=f" of {min_shapes}..{max_shapes} shapes")
    return [scenes.draw(rng, max_shapes, min_shapes) for _ in range(count)]


def _row(query_text: str, query_image: str, texts: list[str], images: list[str]) -> dict[str, Any]:
    return {"qry_text": query_text, "qry_img_path": query_image, "tgt_text": texts, "tgt_img_path": images}


def _crop(image: Image.Image, shape: Shape, size: int) -> Image.Image:
    cx, cy = (coordinate * image.width for coordinate in POSITIONS[shape.position])
    half = image.width * 0.22
    box = tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    return image.crop(box).resize((size, size))


def write_synthetic_benchmark(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    queries: int = 24,
    candidates: int = 8,
    pool: int | None = None,
    image_size: int = 64,
) -> Path:
    """Write the synthetic benchmark (see the module docstring) and return its root.

    Args:
        directory: where to write it.
        seed: the random seed (same seed, same benchmark).
        queries: queries per MMEB dataset, rows per SugarCrepe category and images of the retrieval set.
        candidates: candidates per query for retrieval and grounding (classification and VQA list every label).
        pool: scenes the retrieval and grounding candidates are drawn from (default `2 * queries`); smaller
            pools repeat candidates more.
        image_size: side of the drawn images, in pixels.
    """
    if queries < 1 or candidates < 2:
        raise ValueError(f"need queries >= 1 and candidates >= 2, got {queries} and {candidates}")
    pool = pool if pool is not None else 2 * queries
    if pool < max(queries, candidates):
        raise ValueError(
            f"pool ({pool}) must hold at least max(queries, candidates) = {max(queries, candidates)} scenes"
        )
    target = Path(directory)
    arguments = {
        "seed": seed,
        "queries": queries,
        "candidates": candidates,
        "pool": pool,
        "image_size": image_size,
        "version": 2,
    }
    manifest = target / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == arguments:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.writing-"))
    try:
        _write(staging, random.Random(f"unime-eval-synthetic-{seed}"), queries, candidates, pool, image_size)
        write_json_atomic(staging / MANIFEST, arguments)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write(root: Path, rng: random.Random, queries: int, candidates: int, pool: int, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = _ImageStore(root / "images")
    datasets: dict[str, list[dict[str, Any]]] = {name: [] for name in CATEGORIES}
    colors, shapes, places = sorted(COLORS), list(SHAPES), sorted(POSITIONS)

    def ordered(answer: str, labels: list[str]) -> list[str]:
        return [answer] + [label for label in labels if label != answer]

    # Classification: one shape per scene, the label set as candidates (as MMEB lists every class).
    for scene in _distinct_scenes(rng, queries, max_shapes=1):
        image = store.add(draw_scene(scene, size))
        shape = scene[0]
        datasets["Synthetic-Color"].append(
            _row(
                "<|image_1|>\nRepresent the given image for classification of its color.",
                image,
                ordered(shape.color, colors),
                [""] * len(colors),
            )
        )
    for scene in _distinct_scenes(rng, queries, max_shapes=1):
        image = store.add(draw_scene(scene, size))
        datasets["Synthetic-Shape"].append(
            _row(
                "<|image_1|>\nRepresent the given image for classification of its shape.",
                image,
                ordered(scene[0].kind, shapes),
                [""] * len(shapes),
            )
        )

    # VQA: two-shape scenes; the question asks one attribute of one shape, the answers of that type are listed.
    for scene in _distinct_scenes(rng, queries, max_shapes=2, min_shapes=2):
        image = store.add(draw_scene(scene, size))
        shape = rng.choice(scene)
        where = "in the center" if shape.position == "center" else f"on the {shape.position}"
        question, answer, labels = rng.choice(
            [
                (f"What color is the {shape.kind} {where}?", shape.color, colors),
                (f"What shape is {where}?", shape.kind, shapes),
                (f"Where is the {shape.color} {shape.kind}?", shape.position, places),
            ]
        )
        datasets["Synthetic-VQA"].append(
            _row(
                f"<|image_1|>\nRepresent the given image with the following question: {question}",
                image,
                ordered(answer, labels),
                [""] * len(labels),
            )
        )

    # Retrieval both ways, candidates drawn from a shared pool of two-shape scenes.
    pool_scenes = _distinct_scenes(rng, pool, max_shapes=2, min_shapes=2)
    pool_images = [store.add(draw_scene(scene, size)) for scene in pool_scenes]
    for index in rng.sample(range(pool), queries):
        others = rng.sample([i for i in range(pool) if i != index], candidates - 1)
        datasets["Synthetic-T2I"].append(
            _row(
                f"Find me an everyday image that matches the given caption: {describe(pool_scenes[index])}",
                "",
                ["<|image_1|>\nRepresent the given image."] * candidates,
                [pool_images[i] for i in [index, *others]],
            )
        )
    for index in rng.sample(range(pool), queries):
        others = rng.sample([i for i in range(pool) if i != index], candidates - 1)
        datasets["Synthetic-I2T"].append(
            _row(
                "<|image_1|>\nFind an image caption describing the given everyday image.",
                pool_images[index],
                [describe(pool_scenes[i]) for i in [index, *others]],
                [""] * candidates,
            )
        )

    # Grounding: the crop around the named shape, among crops of the scene's other shape and of pool scenes.
    pool_crops = [store.add(_crop(draw_scene(scene, size), shape, size)) for scene in pool_scenes for shape in scene]
    for scene in _distinct_scenes(rng, queries, max_shapes=2, min_shapes=2):
        drawn = draw_scene(scene, size)
        shape, other = rng.sample(scene, 2)
        crops = [store.add(_crop(drawn, shape, size)), store.add(_crop(drawn, other, size))]
        crops += rng.sample([crop for crop in pool_crops if crop not in crops], candidates - 2)
        datasets["Synthetic-Grounding"].append(
            _row(
                f'<|image_1|>\nSelect the portion of the image that isolates the object labeled as "{shape.color} '
                f'{shape.kind}".',
                store.add(drawn),
                ["<|image_1|>\nRepresent the given cropped image of the object."] * candidates,
                crops,
            )
        )

    for name, rows in datasets.items():
        (root / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), root / name / "test-00000.parquet")
    write_json_atomic(root / "categories.json", CATEGORIES)
    _write_sugarcrepe(root / "sugarcrepe", rng, queries, size)
    _write_retrieval(root / "retrieval", rng, queries, size)
    _write_visdoc(root / "visdoc", rng, queries, size)


def _write_sugarcrepe(folder: Path, rng: random.Random, rows_per_category: int, size: int) -> None:
    store = _ImageStore(folder / "images")
    scenes = _distinct_scenes(rng, rows_per_category * len(ATTRIBUTES), max_shapes=2, min_shapes=2)
    for number, attribute in enumerate(ATTRIBUTES):
        rows: dict[str, dict[str, str]] = {}
        for index, scene in enumerate(scenes[number * rows_per_category : (number + 1) * rows_per_category]):
            # Alterations of this attribute only: compare the changed shape field by field.
            variants = [
                variant
                for variant in all_one_attribute_alterations(scene)
                if any(getattr(a, attribute) != getattr(b, attribute) for a, b in zip(scene, variant, strict=True))
            ]
            rows[str(index)] = {
                "filename": store.add(draw_scene(scene, size)),
                "caption": describe(scene),
                "negative_caption": describe(rng.choice(variants)),
            }
        write_json_atomic(folder / f"replace_{ATTRIBUTE_NAMES[attribute]}.json", rows)


def _write_retrieval(folder: Path, rng: random.Random, images: int, size: int) -> None:
    store = _ImageStore(folder / "images", prefix="images/")
    rows = []
    for scene in _distinct_scenes(rng, images, max_shapes=2, min_shapes=2):
        caption = describe(scene)
        rows.append({"image": store.add(draw_scene(scene, size)), "caption": [caption, f"a picture of {caption}"]})
    write_json_atomic(folder / "test.json", rows)


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_visdoc(folder: Path, rng: random.Random, queries: int, size: int) -> None:
    """A BEIR-layout page set: each query's scene drawn large (relevance 2) and small (relevance 1), images as
    bytes in the corpus table, as the Hugging Face ViDoRe dumps store them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, query_rows, qrels = [], [], []
    for number, scene in enumerate(_distinct_scenes(rng, queries, max_shapes=2, min_shapes=2)):
        for variant, (side, score) in enumerate(((size, 2), (size // 2, 1))):
            page_id = f"page-{number}-{variant}"
            image = {"bytes": _png_bytes(draw_scene(scene, side)), "path": f"{page_id}.png"}
            corpus.append({"corpus-id": page_id, "image": image})
            qrels.append({"query-id": f"q-{number}", "corpus-id": page_id, "score": score})
        query_rows.append({"query-id": f"q-{number}", "query": f"Find the page that shows {describe(scene)}."})
    rng.shuffle(corpus)
    folder.mkdir(parents=True)
    for name, rows in (("corpus", corpus), ("queries", query_rows), ("qrels", qrels)):
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
