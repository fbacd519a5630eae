"""Compositional understanding (SugarCrepe): does the image score its caption above a minimally changed one?

Layout (as RAIVNLab/sugar-crepe ships it): a folder of JSON files, one per category (`add_att.json`,
`replace_obj.json`, `swap_att.json`, ...), each an object `{"<id>": {"filename": "<image>", "caption": "<positive>",
"negative_caption": "<negative>"}}`. Images are relative to an image root (SugarCrepe uses COCO val2017;
default `<folder>/images`). The category is the file's name.

Accuracy: the share of rows where the image (a query) scores its caption strictly higher than the negative
caption (documents); per category, and their mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
from unime.eval.embedding import EmbedStats, ItemTable
from unime.eval.encoders import Encoder
from unime.inputs import Input
from unime.metrics import pairwise_accuracy


@dataclass
class CompositionalSet:
    """Rows as (image row, positive caption row, negative caption row, category)."""

    name: str
    images: ItemTable
    captions: ItemTable
    rows: list[tuple[int, int, int, str]]
    skipped: SkipReport = field(default_factory=SkipReport)


def load_compositional(
    folder: str | Path, *, image_root: str | Path | None = None, on_bad_rows: OnBadRows = "error"
) -> CompositionalSet:
    folder = Path(folder)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise DataError(f"{folder}: expected a folder of SugarCrepe category files (<category>.json)")
    image_root = Path(image_root) if image_root is not None else folder / "images"
    data = CompositionalSet(folder.name, ItemTable(), ItemTable(), [])
    for path in files:
        for number, row in read_numbered_rows(path, dataset=data.name, on_bad_rows=on_bad_rows, skipped=data.skipped):
            try:
                if not isinstance(row.get("caption"), str) or not row["caption"].strip():
                    raise BadRow("row without a caption", "field 'caption' must be a non-empty string")
                if not isinstance(row.get("negative_caption"), str) or not row["negative_caption"].strip():
                    raise BadRow(
                        "row without a negative caption", "field 'negative_caption' must be a non-empty string"
                    )
                filename = row.get("filename")
                if not isinstance(filename, str) or not filename:
                    raise BadRow("row without an image", "field 'filename' must be a non-empty path")
                image = resolve_image(image_root, filename, "row")
            except BadRow as err:
                where = f"{row_origin(path, number, data.name)} (id {row.get('id')!r})"
                handle_bad_row(err, where, on_bad_rows, data.skipped)
                continue
            data.rows.append(
                (
                    data.images.add(Input(image=image, role="query")),
                    data.captions.add(Input(text=row["caption"].strip(), role="document")),
                    data.captions.add(Input(text=row["negative_caption"].strip(), role="document")),
                    path.stem,
                )
            )
    if not data.rows:
        raise DataError(f"{folder}: no usable rows ({data.skipped.count} skipped)")
    return data


def run_compositional(
    encoder: Encoder,
    data: CompositionalSet,
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], EmbedStats]:
    vectors, stats = embed_sets(
        encoder,
        {"images": data.images.items, "captions": data.captions.items},
        dataset=data.name,
        batch_size=batch_size,
        cache_dir=cache_dir,
        progress=progress,
    )
    images, captions = vectors["images"], vectors["captions"]
    image_rows = np.array([row[0] for row in data.rows])
    positive = np.einsum("nd,nd->n", images[image_rows], captions[[row[1] for row in data.rows]])  # [n]
    negative = np.einsum("nd,nd->n", images[image_rows], captions[[row[2] for row in data.rows]])  # [n]
    categories = np.array([row[3] for row in data.rows])
    per_category = {
        str(category): pairwise_accuracy(positive[categories == category], negative[categories == category])
        for category in sorted(set(categories.tolist()))
    }
    return {
        "task": "compositional",
        "dataset": data.name,
        "rows": len(data.rows),
        "scores": {
            **{f"accuracy/{name}": value for name, value in per_category.items()},
            "accuracy/mean": float(np.mean(list(per_category.values()))),
        },
        "skipped": data.skipped.to_dict(),
    }, stats
