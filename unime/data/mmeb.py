"""Convert MMEB-train rows (VLM2Vec's layout) into unime's training schema.

MMEB-train (TIGER-Lab/MMEB-train) has one parquet per subset with the columns `qry`, `qry_image_path`,
`pos_text`, `pos_image_path`, `neg_text`, `neg_image_path`. Texts carry Phi-3.5-V's image placeholder
(`<|image_1|>`), which unime's prompt template replaces with the backbone's own, so it is removed here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from unime.atomic import write_jsonl_atomic
from unime.data.dataset import DataError, require_rows

MMEB_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")


def _side(text: Any, image: Any) -> dict[str, str] | None:
    text = _IMAGE_PLACEHOLDER.sub("", text).strip() if isinstance(text, str) else ""
    image = image.strip() if isinstance(image, str) else ""
    side = {key: value for key, value in (("text", text), ("image", image)) if value}
    return side or None


def convert_mmeb_row(row: dict[str, Any], *, source: str, origin: str = "") -> dict[str, Any]:
    """One MMEB-train row as a unime training row."""
    missing = [column for column in ("qry", "qry_image_path", "pos_text", "pos_image_path") if column not in row]
    if missing:
        raise DataError(f"{origin}: not an MMEB-train row: missing column(s) {missing}; expected {list(MMEB_COLUMNS)}")
    query = _side(row["qry"], row["qry_image_path"])
    positive = _side(row["pos_text"], row["pos_image_path"])
    if query is None or positive is None:
        raise DataError(f"{origin}: field '{'qry' if query is None else 'pos_text'}': empty query or positive")
    converted: dict[str, Any] = {"query": query, "positive": positive, "source": source}
    negative = _side(row.get("neg_text"), row.get("neg_image_path"))
    if negative is not None:
        converted["negatives"] = [negative]
    return converted


def convert_mmeb_file(in_path: str | Path, out_path: str | Path, *, source: str | None = None) -> int:
    """Convert one MMEB-train parquet (or JSONL) subset into a unime JSONL file, written atomically."""
    import datasets

    in_path, out_path = Path(in_path), Path(out_path)
    source = source or in_path.stem
    kind = "parquet" if in_path.suffix.lower() == ".parquet" else "json"
    try:
        table = datasets.load_dataset(kind, data_files=str(in_path), split="train")
    except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise DataError(f"{in_path}: cannot read it as {kind} ({err})") from err
    rows = (
        convert_mmeb_row(row, source=source, origin=f"{in_path}:{index}") for index, row in enumerate(table, start=1)
    )
    return write_jsonl_atomic(out_path, require_rows(rows, in_path))
