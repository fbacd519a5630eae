"""Generated data on disk: sharded JSONL files plus a `manifest.json` that says what a run produced.

Every generator (procedural scenes, the MLLM generator) writes through `ShardedJsonlWriter`:

    with ShardedJsonlWriter(out_dir, manifest=Manifest(prompt_version="v1", model="tiny", seed=0)) as writer:
        for key, make in work:                      # key: idempotent, e.g. "scene-000042/vqa"
            if key in writer:                       # written (or rejected) by an earlier, interrupted run
                continue
            record = make()
            if record is None:
                writer.reject(key, "invalid_json")  # counted by reason, never written as data
            else:
                writer.write(key, record, signature=near_duplicate_signature(record))

Layout of `out_dir`:
- `shard-00000.jsonl`, ...: committed shards, training rows only (what `unime.data.load_examples` reads);
  each appears at once (written beside, then renamed) when it fills up or the writer closes.
- `shard-00000.keys`: one JSON line per record of that shard, in order: its key and near-duplicate signature,
  or its key and rejection reason. Resuming reads these, so no record is written twice.
- `.shard-00001.partial`: the shard being filled, one flushed line per record (key, signature or reason,
  record). A run killed mid-shard loses at most the line being written: the next run reads the complete lines
  back and goes on from there.
- `manifest.json`: the `Manifest`, rewritten atomically at each commit and at close.

Counts in the manifest are recomputed from the shards' key files on open, so they stay exact across
interruptions. Near-duplicates are found by exact match of a normalised signature (see
`near_duplicate_signature`) within one output folder; `--shard i/N` jobs write separate folders.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from unime.atomic import atomic_write, remove_orphaned_temporaries, write_json_atomic
from unime.errors import ConfigError

MANIFEST_NAME = "manifest.json"
NEAR_DUPLICATE = "near_duplicate"
"""The rejection reason of a record whose signature an earlier record of the same folder has."""


@dataclass
class Manifest:
    """What a generation run produced; `manifest.json` beside the shards."""

    generated: int = 0
    """Records produced: kept + rejected."""
    kept: int = 0
    """Records written as data."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Records not written, by reason (e.g. "unreadable_image", "invalid_json", "near_duplicate")."""
    prompt_version: str = ""
    """Version of the prompts or templates that produced the records."""
    model: str = ""
    """The generating model ("procedural" for drawn scenes)."""
    seed: int = 0
    """The run's seed."""
    shards: list[str] = field(default_factory=list)
    """File names of the committed shards, in order, relative to the manifest's folder."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The generator's settings that decide what it writes (e.g. negatives per row), JSON-serialisable. A run
    resumes a folder only with the same settings, prompt_version, model and seed."""
    details: dict[str, Any] = field(default_factory=dict)
    """Generator-specific settings and counts (e.g. rows per task kind), JSON-serialisable."""

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to `path` (a file, or a folder that gets `manifest.json`)."""
        write_json_atomic(_manifest_path(path), asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        """Read `path` (a file, or a folder holding `manifest.json`); names the file and field on error."""
        path = _manifest_path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a readable manifest ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown manifest field(s) {unknown}; expected {sorted(known)}")
        return cls(**raw)


def make_output_directory(directory: str | os.PathLike) -> Path:
    """Create the output folder `directory` (and its parents); a path that is, or lies under, a file is refused
    with the path named, not a traceback."""
    directory = Path(directory)
    blocking = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        where = "it is a file" if blocking == directory else f"{blocking} is a file"
        raise ConfigError(f"{directory}: cannot write the output folder there: {where}, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{directory}: cannot create the output folder ({err.strerror})") from err
    return directory


SAME_RUN_FIELDS = ("prompt_version", "model", "seed")
"""Manifest fields (besides `settings`) that must match for a run to resume a folder."""


def manifest_differences(before: Manifest, now: Manifest) -> list[str]:
    """What differs between a folder's manifest and this run's settings, one "name: was X, now Y" per item."""
    differences = [
        f"{name}: was {getattr(before, name)!r}, now {getattr(now, name)!r}"
        for name in SAME_RUN_FIELDS
        if getattr(before, name) != getattr(now, name)
    ]
    # Compared as JSON, as they are stored: a tuple in this run's settings is a list in the file.
    was_settings, now_settings = json.loads(json.dumps(before.settings)), json.loads(json.dumps(now.settings))
    for name in sorted(set(was_settings) | set(now_settings)):
        was, will = was_settings.get(name, "<not recorded>"), now_settings.get(name, "<not recorded>")
        if was != will:
            differences.append(f"{name}: was {was!r}, now {will!r}")
    return differences


def _manifest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() or not path.suffix else path


def near_duplicate_signature(record: dict) -> str:
    """A signature equal for records that differ only in case, spacing or punctuation of their texts.

    Covers every side's text, instruction and image path (generators name images by content or by key, so a
    shared path means a shared image).
    """
    sides = [record.get("query"), record.get("positive")]
    parts = []
    for side in sides:
        if isinstance(side, dict):
            parts += [_normalise(side.get("instruction")), _normalise(side.get("text")), str(side.get("image") or "")]
    return "|".join(parts)


def _normalise(text: str | None) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text or "").lower().split())


class ShardedJsonlWriter:
    """Appends records keyed by an idempotent key to `shard-XXXXX.jsonl` files; resumes by skipping done keys.

    Args:
        directory: the output folder (created).
        manifest: the run's settings (prompt_version, model, seed, details); counts and shards are filled in.
        records_per_shard: kept records per shard file.
    """

    def __init__(
        self, directory: str | os.PathLike, *, manifest: Manifest | None = None, records_per_shard: int = 1000
    ):
        if records_per_shard < 1:
            raise ConfigError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.directory = make_output_directory(directory)
        self.records_per_shard = records_per_shard
        self.manifest = manifest if manifest is not None else Manifest()
        self._keys: set[str] = set()
        self._signatures: set[str] = set()
        self._rejected: Counter[str] = Counter()
        self._kept = 0
        self._shards: list[str] = []
        self._pending: list[dict] = []  # entries of the open shard: {"key", "signature"|"rejected", "record"?}
        self._partial_handle = None
        self._check_same_run()
        self._recover()
        # Record the settings before any record: a run killed before its first commit is still checked on resume.
        self._save_manifest()

    # -- public API ---------------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        """Whether `key` was already written or rejected (by this run or an earlier one)."""
        return key in self._keys

    def write(self, key: str, record: dict, *, signature: str | None = None) -> bool:
        """Append `record` under `key`. Returns False (writing nothing) if the key is done, or if `signature`
        matches an earlier record's (then the record is counted as rejected, reason "near_duplicate")."""
        if key in self._keys:
            return False
        if signature is not None and signature in self._signatures:
            self.reject(key, NEAR_DUPLICATE)
            return False
        self._append({"key": key, "signature": signature, "record": record})
        return True

    def reject(self, key: str, reason: str) -> bool:
        """Count `key` as rejected for `reason` (never written as data). Returns False if the key is done."""
        if key in self._keys:
            return False
        self._append({"key": key, "rejected": reason})
        return True

    def close(self) -> Manifest:
        """Commit the open shard and save the manifest; returns it."""
        self._commit()
        self._save_manifest()
        return self.manifest

    def __enter__(self) -> ShardedJsonlWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        # Also on an exception: what was written is complete records, and committing it loses nothing.
        self.close()

    # -- internals ----------------------------------------------------------------------------------------

    def _shard_name(self, index: int) -> str:
        return f"shard-{index:05d}.jsonl"

    def _keys_path(self, shard_name: str) -> Path:
        return self.directory / shard_name.replace(".jsonl", ".keys")

    def _partial_path(self) -> Path:
        return self.directory / f".{self._shard_name(len(self._shards)).replace('.jsonl', '.partial')}"

    def _check_same_run(self) -> None:
        """Resuming with other settings would mix two runs in one folder: refuse, naming every difference."""
        path = self.directory / MANIFEST_NAME
        if not path.is_file():
            return
        differences = manifest_differences(Manifest.load(path), self.manifest)
        if differences:
            raise ConfigError(
                f"{path}: this folder was written with other settings ({'; '.join(differences)}); resume with the "
                "same settings or write to another folder"
            )

    def _recover(self) -> None:
        """Read back committed shards (by their key files) and the open shard's partial log; delete what a
        killed run left half-written (temporary files of atomic writes, here and in subfolders such as images/)."""
        for folder in (self.directory, *(p for p in self.directory.iterdir() if p.is_dir())):
            remove_orphaned_temporaries(folder)
        index = 0
        while (self.directory / self._shard_name(index)).is_file():
            name = self._shard_name(index)
            keys_path = self._keys_path(name)
            if not keys_path.is_file():
                raise ConfigError(f"{self.directory / name}: its key file {keys_path.name} is missing; cannot resume")
            for line in keys_path.read_text(encoding="utf-8").splitlines():
                self._account(json.loads(line))
            self._shards.append(name)
            index += 1
        for stale in self.directory.glob(".shard-*.partial"):
            if stale != self._partial_path():
                stale.unlink()  # committed already (the run stopped between commit and clean-up)
        partial = self._partial_path()
        if partial.is_file():
            for line in partial.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # the line being written when the run was killed: it is redone
                self._account(entry)
                self._pending.append(entry)
            # Rewrite the log without a torn last line, so that appending goes on from a clean end.
            with atomic_write(partial) as handle:
                for entry in self._pending:
                    handle.write(json.dumps(entry) + "\n")
        self._sync_manifest()

    def _account(self, entry: dict) -> None:
        self._keys.add(entry["key"])
        if "rejected" in entry:
            self._rejected[entry["rejected"]] += 1
        else:
            self._kept += 1
            if entry.get("signature") is not None:
                self._signatures.add(entry["signature"])

    def _append(self, entry: dict) -> None:
        if self._partial_handle is None:
            self._partial_handle = self._partial_path().open("a", encoding="utf-8")
        self._partial_handle.write(json.dumps(entry) + "\n")
        self._partial_handle.flush()
        self._account(entry)
        self._pending.append(entry)
        if sum("record" in e for e in self._pending) >= self.records_per_shard:
            self._commit()
            self._save_manifest()

    def _commit(self) -> None:
        """Write the open shard and its key file atomically, then drop its partial log."""
        if self._partial_handle is not None:
            self._partial_handle.close()
            self._partial_handle = None
        if not self._pending:
            return
        partial = self._partial_path()
        name = self._shard_name(len(self._shards))
        index_entries = [{k: v for k, v in entry.items() if k != "record"} for entry in self._pending]
        # Key file first: a shard file is only trusted with its key file beside it.
        with atomic_write(self._keys_path(name)) as handle:
            for entry in index_entries:
                handle.write(json.dumps(entry) + "\n")
        with atomic_write(self.directory / name) as handle:
            for entry in self._pending:
                if "record" in entry:
                    handle.write(json.dumps(entry["record"]) + "\n")
        self._shards.append(name)
        self._pending = []
        partial.unlink(missing_ok=True)

    def _sync_manifest(self) -> None:
        self.manifest.kept = self._kept
        self.manifest.rejected = dict(sorted(self._rejected.items()))
        self.manifest.generated = self._kept + sum(self._rejected.values())
        self.manifest.shards = list(self._shards)

    def _save_manifest(self) -> None:
        self._sync_manifest()
        self.manifest.save(self.directory / MANIFEST_NAME)

    @property
    def shard_paths(self) -> list[Path]:
        """Paths of the committed shards."""
        return [self.directory / name for name in self._shards]
