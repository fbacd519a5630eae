"""Atomic writes: content replaces the target only on success, and files get the mode the umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from unime.atomic import atomic_write, remove_orphaned_temporaries, write_json_atomic, write_jsonl_atomic
from unime.embedding_store import EmbeddingStore
from unime.train.teacher import TeacherCache


@pytest.fixture()
def umask():
    """Set a umask for the test; restore the previous one after it."""
    previous = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    expected = 0o666 & ~mask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any other file gets
    assert _mode(plain) == expected
    write_json_atomic(tmp_path / "a.json", {"a": 1})
    write_jsonl_atomic(tmp_path / "b.jsonl", [{"b": 2}])
    with atomic_write(tmp_path / "c.bin", "wb") as handle:
        handle.write(b"\x00\x01")
    for name in ("a.json", "b.jsonl", "c.bin"):
        assert _mode(tmp_path / name) == expected, name
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"


def test_generated_data_and_caches_follow_the_umask(tmp_path, umask):
    from unime.data_synth.tasks import TaskSynthConfig, write_task_examples

    umask(0o002)
    result = write_task_examples(tmp_path / "tasks", TaskSynthConfig(train=3, held_out=1, image_size=48))
    cache = EmbeddingStore(tmp_path / "cache", "model")
    cache.fill(["k"], lambda positions: np.ones((len(positions), 4), dtype=np.float32))
    teacher = TeacherCache(tmp_path / "teacher", "a-teacher", encode=lambda texts: np.ones((len(texts), 4)))
    teacher.ensure(["a text"])
    written = [
        *result.directories["train"].rglob("*.png"),
        *result.shard_paths("train"),
        result.directories["train"] / "manifest.json",
        *(tmp_path / "cache").rglob("shard-*.pt"),
        *(tmp_path / "teacher").rglob("shard-*.pt"),
        *(tmp_path / "teacher").rglob("meta.json"),
    ]
    assert len(written) >= 8
    assert {path.name: _mode(path) for path in written} == {path.name: 0o664 for path in written}


def test_a_failed_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "keep.json"
    write_json_atomic(target, {"old": True})
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write('{"new": ')
        raise RuntimeError("interrupted")
    assert target.read_text() == '{\n  "old": true\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


def test_orphaned_temporaries_are_removed_and_nothing_else(tmp_path):
    orphan = tmp_path / ".shard-00000.jsonl.0123456789ab.tmp"
    orphan.write_text("half")
    kept = [tmp_path / "data.tmp", tmp_path / ".hidden", tmp_path / "shard-00000.jsonl"]
    for path in kept:
        path.write_text("keep")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".x.png.0123.tmp").write_text("not this folder's")
    assert remove_orphaned_temporaries(tmp_path) == [orphan]
    assert all(path.exists() for path in kept) and (tmp_path / "sub" / ".x.png.0123.tmp").exists()
    assert remove_orphaned_temporaries(tmp_path / "missing") == []
