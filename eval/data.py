"""Reading benchmark files (parquet, JSONL, JSON) and reporting bad rows, shared by every task.

A bad row raises `DataError` naming the dataset and the row as `file:line`, 1-based, as training and JSON errors
do (the line of a JSONL file; the row of a parquet or JSON file); with `on_bad_rows="skip"` it is dropped
instead and counted in a `SkipReport`, which the results carry (nothing is lost silently). A missing or
unreadable image is a bad row of the row that names it, found when the data is read, not when it is embedded.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unime.data.dataset import DataError, image_problem

OnBadRows = Literal["error", "skip"]


@dataclass
class SkipReport:
    """Rows dropped because they were bad, with why."""

    count: int = 0
    reasons: Counter = field(default_factory=Counter)
    """Reason (without the row number) -> how many rows."""
    examples: list[str] = field(default_factory=list)
    """The first few full messages, with file and row."""

    def add(self, message: str, reason: str) -> None:
        self.count += 1
        self.reasons[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "reasons": dict(self.reasons), "examples": list(self.examples)}


class BadRow(Exception):
    """Raised by a row parser; the caller adds where it happened, then raises or skips."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}{': ' + detail if detail else ''}")


def handle_bad_row(err: BadRow, where: str, on_bad_rows: OnBadRows, skipped: SkipReport) -> None:
    message = f"{where}: {err}"
    if on_bad_rows == "error":
        raise DataError(message + " (pass on_bad_rows='skip' / --on-bad-rows skip to drop such rows)") from err
    skipped.add(message, err.reason)


def row_origin(path: Path, number: int, dataset: str | None = None) -> str:
    """Where a row is, for messages: `dataset 'X', file:line` (1-based)."""
    return f"{f'dataset {dataset!r}, ' if dataset else ''}{path}:{number}"


def read_numbered_rows(
    path: Path, *, dataset: str | None = None, on_bad_rows: OnBadRows = "error", skipped: SkipReport | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """All rows of a parquet, JSONL or JSON (a list of objects, or an object of objects) file, each with its
    1-based number: its line in a JSONL file, its position in a parquet or JSON file. A JSONL line that is not
    JSON is a bad row (raised, or skipped into `skipped`); a file that cannot be read is a `DataError`."""
    suffix = path.suffix.lower()
    where = f"dataset {dataset!r}, {path}" if dataset else str(path)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(enumerate(pq.read_table(path).to_pylist(), start=1))
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            rows.append((number, json.loads(line)))
                        except json.JSONDecodeError as err:
                            bad = BadRow("not valid JSON", f"{err.msg} at column {err.colno}")
                            handle_bad_row(bad, row_origin(path, number, dataset), on_bad_rows, skipped or SkipReport())
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = [
                    {"id": key, **value} if isinstance(value, dict) else {"id": key, "value": value}
                    for key, value in data.items()
                ]
            if isinstance(data, list):
                return list(enumerate(data, start=1))
            raise DataError(f"{where}: expected a JSON list or object of rows, got {type(data).__name__}")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user: unreadable file
        raise DataError(f"{where}: cannot read it as {suffix.lstrip('.')} ({err})") from err
    raise DataError(f"{where}: unsupported file type {suffix!r}; expected .parquet, .jsonl or .json")


def resolve_image(image_root: Path, relative: str, what: str) -> Path:
    """The file of an image path relative to the image root; a missing file is a bad row."""
    path = (image_root / relative).resolve() if not Path(relative).is_absolute() else Path(relative)
    if not path.is_file():
        raise BadRow("missing image", f"{what} image {relative!r} is not a file under the image root {image_root}")
    check_image(path, f"{what} image {relative!r}")
    return path


def check_image(path: Path, what: str) -> None:
    """A file that is not a readable image is a bad row (`unreadable image`), not an encoder failure later."""
    stat = path.stat()
    problem = _image_problem(str(path), stat.st_size, stat.st_mtime_ns)
    if problem is not None:
        raise BadRow("unreadable image", f"{what}: {problem}")


_IMAGE_PROBLEMS: dict[tuple[str, int, int], str | None] = {}
"""Checked images by path, size and modification time: a benchmark names one image in many rows."""


def _image_problem(path: str, size: int, mtime_ns: int) -> str | None:
    key = (path, size, mtime_ns)
    if key not in _IMAGE_PROBLEMS:
        _IMAGE_PROBLEMS[key] = image_problem(Path(path))
    return _IMAGE_PROBLEMS[key]
