"""Single sentences as stage-1 training rows: each sentence is its own positive.

Text distillation matches the teacher's in-batch similarity distribution; with query = positive that is the
distribution of each sentence over the batch's sentences, so a plain sentence corpus (one per line, or JSONL
with a `text` field) trains stage 1 as well as sentence pairs do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from unime.atomic import write_jsonl_atomic
from unime.data.dataset import DataError, require_rows


def read_sentences(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, sentence) of a `.txt` (one per line) or `.jsonl` (`{"text": ...}`) file; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sentence file does not exist")
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if not jsonl:
                yield number, line.strip()
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: field 'text': expected a non-empty string")
            yield number, text.strip()


def convert_sentences_file(in_path: str | Path, out_path: str | Path, *, source: str | None = None) -> int:
    """Write each sentence as a training row whose query and positive are the sentence."""
    source = source or Path(in_path).stem
    rows = ({"query": {"text": s}, "positive": {"text": s}, "source": source} for _, s in read_sentences(in_path))
    return write_jsonl_atomic(out_path, require_rows(rows, in_path))
