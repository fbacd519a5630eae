"""Reading benchmark files (parquet, JSONL, JSON) and reporting bad rows, shared by every task.

A bad row raises `DataError` naming the dataset, the file and the row; with `on_bad_rows="skip"` it is
dropped instead and counted in a `SkipReport`, which the results carry (nothing is lost silently).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unime.data.dataset import DataError

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
        raise DataError(message + " (pass on_bad_rows='skip' / --skip-bad-rows to drop such rows)") from err
    skipped.add(message, err.reason)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All rows of a parquet, JSONL or JSON (a list of objects, or an object of objects) file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path}:{number}: not valid JSON ({err})") from err
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return [
                    {"id": key, **value} if isinstance(value, dict) else {"id": key, "value": value}
                    for key, value in data.items()
                ]
            if isinstance(data, list):
                return data
            raise DataError(f"{path}: expected a JSON list or object of rows, got {type(data).__name__}")
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user: unreadable file
        raise DataError(f"{path}: cannot read it as {suffix.lstrip('.')} ({err})") from err
    raise DataError(f"{path}: unsupported file type {suffix!r}; expected .parquet, .jsonl or .json")


def resolve_image(image_root: Path, relative: str, what: str) -> Path:
    """The file of an image path relative to the image root; a missing file is a bad row."""
    path = (image_root / relative).resolve() if not Path(relative).is_absolute() else Path(relative)
    if not path.is_file():
        raise BadRow("missing image", f"{what} image {relative!r} is not a file under the image root {image_root}")
    return path
