"""Read training files into validated examples, naming the file, row and field of every problem.

Files are JSONL or parquet, read with the `datasets` library. Every row is validated before training starts
(fields, types, image files present and readable); `on_error="raise"` stops at the first bad row, `"skip"`
drops bad rows and reports how many were dropped and why.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from unime.data.schema import DEFAULT_SOURCE, ROW_KEYS, SIDE_KEYS, TrainExample
from unime.errors import UnimeError
from unime.inputs import Input


class DataError(UnimeError, ValueError):
    """A training row or file is invalid; the message names the file, row and field."""


@dataclass
class LoadReport:
    """What loading kept and dropped."""

    kept: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples_of_errors: list[str] = field(default_factory=list)
    skipped_rows: list[dict[str, Any]] = field(default_factory=list)
    """Every skipped row: {"file", "line" (1-based line of JSONL, 1-based row of parquet), "reason"}."""

    def summary(self) -> str:
        text = f"{self.kept} examples kept, {self.skipped} skipped"
        if self.reasons:
            text += " (" + ", ".join(f"{count}x {reason}" for reason, count in self.reasons.most_common()) + ")"
        return text


def load_examples(
    files: Sequence[str | Path],
    *,
    image_root: str | Path | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    check_images: bool = True,
    min_negatives: int = 0,
) -> tuple[list[TrainExample], LoadReport]:
    """Read and validate training rows.

    Args:
        files: JSONL (`.jsonl`/`.json`) or parquet (`.parquet`) files.
        image_root: where relative image paths point; default: the folder of each file.
        on_error: stop at the first bad row, or skip bad rows and count them in the report.
        check_images: open every image's header (catches missing and unreadable files before training).
        min_negatives: rows with fewer mined negatives are bad (hard-negative recipes need k per query).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not files:
        raise DataError("no training files given")
    report = LoadReport()
    examples: list[TrainExample] = []
    checked_images: dict[Path, str | None] = {}
    for file in files:
        path = Path(file)
        root = Path(image_root) if image_root is not None else path.parent
        for row_number, row in _read_rows(path, on_error, report):
            origin = f"{path}:{row_number}"
            try:
                example = parse_row(row, origin=origin, image_root=root)
                if len(example.negatives) < min_negatives:
                    raise DataError(
                        f"{origin}: field 'negatives': has {len(example.negatives)}, the recipe needs at least "
                        f"{min_negatives} per query"
                    )
                if check_images:
                    _check_images(example, origin, checked_images)
            except DataError as err:
                if on_error == "raise":
                    raise
                _count_skip(report, err, path, row_number)
                continue
            examples.append(example)
    report.kept = len(examples)
    if not examples:
        raise DataError(f"no valid training rows in {', '.join(map(str, files))}: {report.summary()}")
    return examples, report


def require_rows(rows: Iterable[dict], source: str | Path) -> Iterator[dict]:
    """`rows`, passed through; raises `DataError` naming `source` at the end when there were none (a converter
    writing an empty training file would only fail later, far from the cause)."""
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise DataError(f"{source}: no rows to convert (the file is empty)")


def _count_skip(report: LoadReport, err: DataError, path: Path, row_number: int) -> None:
    report.skipped += 1
    message = str(err)
    # The reason without the file:row prefix, so that identical problems are counted together.
    report.reasons[message.split(": ", 1)[-1].split(" (")[0]] += 1
    report.skipped_rows.append({"file": str(path), "line": row_number, "reason": message.split(": ", 1)[-1]})
    if len(report.examples_of_errors) < 10:
        report.examples_of_errors.append(message)


def _read_rows(path: Path, on_error: str, report: LoadReport):
    """Yield (row number, row dict). Row numbers are 1-based lines for JSONL and 1-based rows for parquet."""
    if not path.is_file():
        raise DataError(f"{path}: training file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import datasets

        try:
            table = datasets.Dataset.from_parquet(str(path))
        except Exception as err:  # noqa: BLE001 - pyarrow raises many types; all mean an unreadable file
            raise DataError(f"{path}: not a readable parquet file ({err})") from err
        for index, row in enumerate(table):
            yield index + 1, row
        return
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unknown training file type {suffix!r}; expected .jsonl or .parquet")
    rows = _jsonl_with_datasets(path)
    if rows is not None:
        yield from enumerate(rows, start=1)
        return
    # The datasets reader refused the file (a malformed line): read it line by line to name the line.
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                error = DataError(f"{path}:{line_number}: not valid JSON ({err.msg} at column {err.colno})")
                if on_error == "raise":
                    raise error from err
                _count_skip(report, error, path, line_number)
                continue
            yield line_number, row


def _jsonl_with_datasets(path: Path) -> list[dict] | None:
    """Rows through `datasets` (Arrow-backed), or None when it cannot parse the file as a whole."""
    import datasets

    with path.open(encoding="utf-8") as handle:
        blank_lines = any(not line.strip() for line in handle)
    if blank_lines:
        return None  # row numbers would no longer be line numbers
    try:
        table = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:  # noqa: BLE001 - any parse failure falls back to the line reader, which names the line
        return None
    return list(table)


def parse_row(row: Any, *, origin: str, image_root: Path) -> TrainExample:
    row = _present_fields(row, ROW_KEYS, origin, "a JSON object")
    for required in ("query", "positive"):
        if row.get(required) is None:
            raise DataError(f"{origin}: field '{required}' is missing")
    query = parse_side(row["query"], f"{origin}: field 'query'", image_root)
    positive = parse_side(row["positive"], f"{origin}: field 'positive'", image_root)
    raw_negatives = row.get("negatives")
    if raw_negatives is None:
        raw_negatives = []
    if not isinstance(raw_negatives, list):
        raise DataError(f"{origin}: field 'negatives': expected a list of sides, got {type(raw_negatives).__name__}")
    negatives = tuple(
        parse_side(side, f"{origin}: field 'negatives[{i}]'", image_root) for i, side in enumerate(raw_negatives)
    )
    scores = row.get("scores")
    if scores is not None:
        if not isinstance(scores, list) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores
        ):
            raise DataError(f"{origin}: field 'scores': expected a list of finite numbers")
        if len(scores) != 1 + len(negatives):
            raise DataError(
                f"{origin}: field 'scores': has {len(scores)} values, expected {1 + len(negatives)} "
                "(the positive's, then one per negative)"
            )
        scores = tuple(float(s) for s in scores)
    source = row.get("source") or DEFAULT_SOURCE
    if not isinstance(source, str):
        raise DataError(f"{origin}: field 'source': expected a string, got {type(source).__name__}")
    return TrainExample(query, positive, negatives, scores, source, origin)


def _present_fields(raw: Any, allowed: frozenset[str], where: str, expected: str) -> dict[str, Any]:
    """The non-null fields of a mapping, all of them known; a null field is an absent one (Arrow-backed
    readers also fill in, as null, every column that any row has)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected {expected}, got {type(raw).__name__}")
    present = {key: value for key, value in raw.items() if value is not None}
    unknown = sorted(set(present) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; expected {sorted(allowed)}")
    return present


def parse_side(raw: Any, where: str, image_root: Path) -> Input:
    """Validate one side (`{"text", "image", "instruction"}`); errors start with `where` (file:row: field)."""
    raw = _present_fields(raw, SIDE_KEYS, where, "an object with 'text' and/or 'image'")
    text, image, instruction = raw.get("text"), raw.get("image"), raw.get("instruction")
    for name, value in (("text", text), ("image", image), ("instruction", instruction)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}.{name}: expected a string, got {type(value).__name__}")
    text = text if text and text.strip() else None
    if text is None and not image:
        raise DataError(f"{where}: has neither a text nor an image")
    image_path = None
    if image:
        image_path = Path(image) if Path(image).is_absolute() else image_root / image
    return Input(text=text, image=image_path, instruction=instruction or None)


def _check_images(example: TrainExample, origin: str, checked: dict[Path, str | None]) -> None:
    sides = [("query", example.query), ("positive", example.positive)]
    sides += [(f"negatives[{i}]", side) for i, side in enumerate(example.negatives)]
    for name, side in sides:
        if side.image is None:
            continue
        if side.image not in checked:
            checked[side.image] = image_problem(side.image)
        problem = checked[side.image]
        if problem is not None:
            raise DataError(f"{origin}: field '{name}.image': {problem}")


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (missing, unreadable, not an image), or None when it opens."""
    if not path.is_file():
        return f"image file {str(path)!r} does not exist"
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return f"image file {str(path)!r} is not a readable image ({err})"
    return None
