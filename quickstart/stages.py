"""Resumable stages: each one runs once, records what it wrote, and is skipped when run again.

A stage's record (`<out>/stages/<name>.json`, written atomically after its artefacts are complete) holds a
fingerprint of its settings and of every stage before it, its artefacts and its metrics. Running again skips a
stage whose record matches and whose artefacts exist; a stage cut short has no record and runs again, and a
training stage then resumes from its checkpoints (the training loop does that). When a stage's settings (or an
earlier stage's) change, its work folder is cleared and it runs from scratch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unime.atomic import write_json_atomic

STAGES = ("data", "stage1", "mining", "stage2", "reranker", "eval", "serve", "multi_vector", "three_heads", "report")
"""Every stage, in the order they run."""


@dataclass
class StageResult:
    artefacts: dict[str, str]
    """Named paths the stage wrote; the first is the one its summary line names."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Numbers the report shows."""


@dataclass
class StageRunner:
    out: Path
    """The quickstart's output folder."""
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each finished stage's record, by name."""
    _chain: str = ""

    def run(self, name: str, label: str, settings: Any, work_dir: Path | None, action: Callable[[], StageResult]):
        """Run `action` unless an earlier run finished this stage with the same settings; returns its record.

        `label` names the main artefact in the summary line; `work_dir` is the folder the stage writes to (cleared
        when its settings changed since it was started).
        """
        fingerprint = hashlib.sha256(json.dumps([self._chain, name, settings], sort_keys=True).encode()).hexdigest()
        self._chain = fingerprint
        record_path = self.out / "stages" / f"{name}.json"
        record = _read_json(record_path)
        if record and record.get("fingerprint") == fingerprint and _exist(record["artefacts"]):
            print(f"stage {name}: {label} -> {first(record['artefacts'])} (finished earlier: skipped)")
            self.records[name] = record
            return record
        if work_dir is not None:
            _claim(work_dir, fingerprint, name)
        started = time.perf_counter()
        result = action()
        record = {
            "fingerprint": fingerprint,
            "artefacts": result.artefacts,
            "metrics": result.metrics,
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_json_atomic(record_path, record)
        print(f"stage {name}: {label} -> {first(result.artefacts)}")
        self.records[name] = record
        return record


def first(artefacts: dict[str, str]) -> str:
    return next(iter(artefacts.values()))


def _exist(artefacts: dict[str, str]) -> bool:
    return all(Path(path).exists() for path in artefacts.values())


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _claim(work_dir: Path, fingerprint: str, name: str) -> None:
    """Mark `work_dir` as this stage's with these settings; clear what a run with other settings left there."""
    marker = work_dir / ".settings-fingerprint"
    if work_dir.exists() and marker.is_file() and marker.read_text() != fingerprint:
        print(f"stage {name}: its settings (or an earlier stage's) changed: starting it again in {work_dir}")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
