"""Atomic file writes: write beside the target, then rename, so a reader never sees half a file.

The file beside the target is named `.<target name>.<random>.tmp`; a run killed mid-write leaves one behind,
which `remove_orphaned_temporaries` clears on the next run. It is created with mode 0666 less the umask, like
any file `open()` creates (`tempfile.mkstemp` would make it 0600, and the rename would keep that).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

TEMPORARY_SUFFIX = ".tmp"
"""Every temporary file of an atomic write is `.<name>.<random>.tmp`."""


def create_temporary(path: Path) -> tuple[int, Path]:
    """Create and open (write-only) a new, empty temporary file beside `path`; returns its descriptor and path.

    The kernel applies the umask to mode 0666, so the published file has the mode any other file would have.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    raise FileExistsError(f"{path.parent}: cannot create a temporary file for {path.name}")  # pragma: no cover


@contextmanager
def atomic_write(path: str | os.PathLike, mode: Literal["w", "wb"] = "w") -> Iterator[IO[Any]]:
    """A handle (text, or binary with mode "wb") whose content replaces `path` only if the block finishes
    without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_orphaned_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of atomic writes in `directory` (not below it); returns what was removed.

    Only for a folder that one run writes at a time: there, a temporary file is what a killed run left behind.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [path for path in directory.glob(f".*{TEMPORARY_SUFFIX}") if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write one JSON object per line; returns the number of rows."""
    count = 0
    with atomic_write(path) as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            count += 1
    return count
