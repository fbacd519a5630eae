"""Image-text retrieval over a shared corpus (Flickr30K, MS-COCO, ShareGPT4V, Urban1K): recall@1/5/10 both ways.

Layouts read (the public ones these benchmarks are distributed in):
- captions file (Flickr30K / MS-COCO Karpathy test splits, as LAVIS and BLIP ship them): a JSON list (or
  JSONL) of `{"image": "<path>", "caption": "<text>" | ["<text>", ...]}`;
- ShareGPT4V: a JSON list of `{"image": "<path>", "conversations": [..., {"from": "gpt", "value": "<caption>"}]}`
  (the first `gpt` turn is the caption; UniME and Long-CLIP evaluate on the first 1,000 rows);
- Urban1K: a folder with `image/<name>.jpg` and `caption/<name>.txt`.
Image paths are relative to an image root (default: the captions file's folder).

Image-to-text: each image is a query, its captions are relevant (found at k when any of them is in the top
k). Text-to-image: each caption is a query, its image is relevant. Queries get the encoder's query role and the
corpus the document role.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unime.data.dataset import DataError
from unime.eval.data import (
    BadRow,
    OnBadRows,
    SkipReport,
    handle_bad_row,
    read_numbered_rows,
    resolve_image,
    row_origin,
)
from unime.eval.embed_sets import embed_sets
from unime.eval.embedding import EmbedStats
from unime.eval.encoders import Encoder
from unime.eval.scoring import corpus_ranks
from unime.inputs import Input
from unime.metrics import hit_at_k

Layout = Literal["auto", "captions", "sharegpt4v", "urban1k"]
RECALL_KS = (1, 5, 10)


@dataclass
class RetrievalDataset:
    """Distinct images and, for each caption, the image it describes."""

    name: str
    images: list[Path]
    captions: list[str]
    caption_image: list[int]
    """For each caption, its image's index in `images`."""
    skipped: SkipReport = field(default_factory=SkipReport)


def detect_layout(path: Path) -> Layout:
    if path.is_dir():
        if (path / "image").is_dir() and (path / "caption").is_dir():
            return "urban1k"
        raise DataError(f"{path}: a retrieval folder must hold image/ and caption/ (Urban1K); or pass a captions file")
    # Only the first row decides: bad lines are left to the loader, which names or skips them.
    rows = read_numbered_rows(path, on_bad_rows="skip", skipped=SkipReport())
    first = rows[0][1] if rows else {}
    if "conversations" in first:
        return "sharegpt4v"
    if "caption" in first or "captions" in first:
        return "captions"
    raise DataError(
        f"{path}: unknown retrieval layout; expected rows with 'image' and 'caption' (Flickr30K/COCO), 'image' and "
        "'conversations' (ShareGPT4V), or an Urban1K folder"
    )


def load_retrieval(
    path: str | Path,
    *,
    layout: Layout = "auto",
    image_root: str | Path | None = None,
    limit: int | None = None,
    on_bad_rows: OnBadRows = "error",
    name: str | None = None,
) -> RetrievalDataset:
    """Read a retrieval benchmark; `limit` keeps its first rows (ShareGPT4V's 1K evaluation set)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such retrieval benchmark file or folder")
    layout = detect_layout(path) if layout == "auto" else layout
    dataset = RetrievalDataset(name or path.stem, [], [], [])
    image_index: dict[Path, int] = {}
    if layout == "urban1k":
        image_root = Path(image_root) if image_root is not None else path / "image"
        # A row per image file; it is named by that file.
        rows: list[tuple[str, dict[str, Any]]] = [
            (
                f"dataset {dataset.name!r}, {image}",
                {"image": image.name, "caption": (path / "caption" / f"{image.stem}.txt")},
            )
            for image in sorted((path / "image").iterdir())
            if image.is_file()
        ]
    else:
        image_root = Path(image_root) if image_root is not None else path.parent
        numbered = read_numbered_rows(path, dataset=dataset.name, on_bad_rows=on_bad_rows, skipped=dataset.skipped)
        rows = [(row_origin(path, number, dataset.name), row) for number, row in numbered]
    rows = rows[:limit] if limit is not None else rows
    for where, row in rows:
        try:
            image, captions = _parse(row, layout, image_root)
        except BadRow as err:
            handle_bad_row(err, where, on_bad_rows, dataset.skipped)
            continue
        if image not in image_index:
            image_index[image] = len(dataset.images)
            dataset.images.append(image)
        for caption in captions:
            dataset.captions.append(caption)
            dataset.caption_image.append(image_index[image])
    if not dataset.captions:
        raise DataError(f"{path}: no usable rows ({dataset.skipped.count} skipped)")
    return dataset


def _parse(row: dict[str, Any], layout: str, image_root: Path) -> tuple[Path, list[str]]:
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        raise BadRow("row without an image", "field 'image' must be a non-empty path")
    if layout == "urban1k":
        caption_file: Path = row["caption"]
        if not caption_file.is_file():
            raise BadRow("image without a caption", f"{caption_file.name} is missing")
        captions: Any = [caption_file.read_text(encoding="utf-8").strip()]
    elif layout == "sharegpt4v":
        turns = row.get("conversations") or []
        captions = [turn.get("value") for turn in turns if isinstance(turn, dict) and turn.get("from") == "gpt"][:1]
    else:
        captions = row.get("caption", row.get("captions"))
        captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not captions:
        raise BadRow("row without a caption")
    if any(not isinstance(caption, str) or not caption.strip() for caption in captions):
        raise BadRow("empty caption", "every caption must be a non-empty string")
    return resolve_image(image_root, image, "row"), [caption.strip() for caption in captions]


def run_retrieval(
    encoder: Encoder,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    faiss_min_corpus: int = 100_000,
    progress: bool = True,
) -> tuple[dict[str, Any], EmbedStats]:
    """Recall@1/5/10 image-to-text and text-to-image."""
    vectors, stats = embed_sets(
        encoder,
        {
            "image queries": [Input(image=image, role="query") for image in dataset.images],
            "caption corpus": [Input(text=caption, role="document") for caption in dataset.captions],
            "caption queries": [Input(text=caption, role="query") for caption in dataset.captions],
            "image corpus": [Input(image=image, role="document") for image in dataset.images],
        },
        dataset=dataset.name,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    image_queries, caption_docs = vectors["image queries"], vectors["caption corpus"]
    caption_queries, image_docs = vectors["caption queries"], vectors["image corpus"]

    captions_of: list[list[int]] = [[] for _ in dataset.images]
    for caption, image in enumerate(dataset.caption_image):
        captions_of[image].append(caption)
    i2t = corpus_ranks(image_queries, caption_docs, captions_of, faiss_min_corpus=faiss_min_corpus)
    t2i = corpus_ranks(
        caption_queries, image_docs, [[image] for image in dataset.caption_image], faiss_min_corpus=faiss_min_corpus
    )
    best_i2t = [float(ranks.min()) for ranks in i2t]
    best_t2i = [float(ranks.min()) for ranks in t2i]
    scores = {f"i2t_recall@{k}": hit_at_k(best_i2t, k) for k in RECALL_KS}
    scores.update({f"t2i_recall@{k}": hit_at_k(best_t2i, k) for k in RECALL_KS})
    return {
        "task": "retrieval",
        "dataset": dataset.name,
        "images": len(dataset.images),
        "captions": len(dataset.captions),
        "scores": scores,
        "skipped": dataset.skipped.to_dict(),
    }, stats
