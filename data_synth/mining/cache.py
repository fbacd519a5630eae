"""Embeddings cached on disk, keyed by model and content, so that a rerun (or another shard) reuses them.

Layout: `<cache_dir>/<model id hash>/chunk-<unique id>.npz`, each chunk holding `keys` (content hashes) and `vectors`
of one batch of new embeddings; chunks are written beside and renamed (atomic), so an interrupted run leaves
only whole chunks, and the next run embeds just what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from unime.atomic import atomic_write


def model_fingerprint(directory: str | os.PathLike) -> str:
    """An id of a saved model that changes when any of its files does (names, sizes, modification times)."""
    directory = Path(directory).resolve()
    parts = [str(directory)]
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            parts.append(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def content_key(*parts: object) -> str:
    """A hash of JSON-serialisable parts (role, instruction, text, image digest...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class EmbeddingCache:
    """Vectors by content key for one model; `cache_dir=None` keeps them in memory only."""

    def __init__(self, cache_dir: str | os.PathLike | None, model_id: str):
        self.directory = None
        self._vectors: dict[str, np.ndarray] = {}
        self.hits = 0
        self.computed = 0
        if cache_dir is None:
            return
        self.directory = Path(cache_dir) / hashlib.sha256(model_id.encode()).hexdigest()[:24]
        self.directory.mkdir(parents=True, exist_ok=True)
        for chunk in sorted(self.directory.glob("chunk-*.npz")):
            with np.load(chunk) as data:
                for key, vector in zip(data["keys"], data["vectors"], strict=True):
                    self._vectors[str(key)] = vector

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        """Vectors `[len(keys), dim]`: cached ones read, the rest computed by `compute(missing positions)`
        (which returns `[len(missing), dim]`) and stored."""
        missing = [i for i, key in enumerate(keys) if key not in self._vectors]
        # Equal keys within one call are computed once.
        first_of: dict[str, int] = {}
        for i in missing:
            first_of.setdefault(keys[i], i)
        to_compute = sorted(first_of.values())
        self.hits += len(keys) - len(missing)
        if to_compute:
            vectors = np.asarray(compute(to_compute), dtype=np.float32)
            self.computed += len(to_compute)
            new = {keys[i]: vector for i, vector in zip(to_compute, vectors, strict=True)}
            self._vectors.update(new)
            self._save_chunk(new)
        return np.stack([self._vectors[key] for key in keys]) if keys else np.zeros((0, 0), dtype=np.float32)

    def _save_chunk(self, new: dict[str, np.ndarray]) -> None:
        if self.directory is None:
            return
        # A unique name: shards on several machines may share one cache folder and write at the same time.
        name = f"chunk-{uuid.uuid4().hex}.npz"
        with atomic_write(self.directory / name, "wb") as handle:
            np.savez(handle, keys=np.array(list(new)), vectors=np.stack(list(new.values())))
