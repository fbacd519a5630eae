"""Embed each distinct item once, reusing (and filling) an on-disk cache keyed by model and content.

The cache is unime's sharded embedding cache (`unime.train.teacher.TeacherCache`, the one stage 1 keeps its
teacher's embeddings in), namespaced by the encoder's fingerprint and keyed by each item's content key (text,
image bytes, role, instruction). Shards are written atomically every `shard_size` new vectors, so a run that
is interrupted resumes by embedding only what is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from unime.eval.encoders import Encoder, EncoderError
from unime.eval.items import Item, content_key


@dataclass
class EmbedStats:
    """How much encoding a benchmark needed."""

    listed: int = 0
    """Items as the benchmark lists them (repeats counted)."""
    distinct: int = 0
    """Distinct items among them."""
    encoded: int = 0
    """Items the encoder was run on in this run (distinct items not found in the cache)."""

    def add(self, other: EmbedStats) -> None:
        self.listed += other.listed
        self.distinct += other.distinct
        self.encoded += other.encoded


def embed_distinct(
    encoder: Encoder,
    items: Sequence[Item],
    *,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    shard_size: int = 1024,
    progress: str | None = None,
) -> tuple[np.ndarray, EmbedStats]:
    """Vectors of distinct items (`items` must hold no repeats), encoding only those not cached.

    Args:
        encoder: the model under evaluation.
        items: distinct items (the caller deduplicates; see `ItemTable`).
        batch_size: items per encoder call. Results do not depend on it.
        cache_dir: where embeddings are kept across runs; None keeps nothing on disk.
        shard_size: new vectors per cache shard (the most work an interruption can lose).
        progress: a progress bar label (e.g. the dataset name); None shows none.

    Returns:
        `[len(items), D]` float32 and what was encoded.
    """
    stats = EmbedStats(listed=len(items), distinct=len(items))
    bar = tqdm(total=len(items), desc=progress or "", unit="item", disable=progress is None, leave=False)
    try:
        if cache_dir is None:
            vectors = _encode_checked(encoder, list(items), batch_size, bar, offset=0)
            stats.encoded = len(items)
            return vectors, stats
        from unime.train.teacher import TeacherCache

        keys = [content_key(item) for item in items]
        by_key = dict(zip(keys, items, strict=True))

        def encode_keys(batch_keys: list[str]) -> np.ndarray:
            return _encode_checked(encoder, [by_key[key] for key in batch_keys], batch_size, bar, offset=0)

        cache = TeacherCache(
            cache_dir,
            encoder.fingerprint,
            encode=encode_keys,
            batch_size=batch_size,
            shard_size=shard_size,
            normalize=False,
        )
        bar.update(sum(1 for key in keys if key in cache))
        stats.encoded = cache.ensure(keys)
        return cache.lookup(keys).numpy(), stats
    finally:
        bar.close()


def _encode_checked(encoder: Encoder, items: list[Item], batch_size: int, bar: tqdm, offset: int) -> np.ndarray:
    vectors: list[np.ndarray] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        out = np.asarray(encoder.encode(batch, batch_size=batch_size), dtype=np.float32)  # [b, D]
        if out.ndim != 2 or out.shape[0] != len(batch):
            raise EncoderError(f"the encoder returned shape {out.shape} for {len(batch)} items; expected [n, dim]")
        if not np.isfinite(out).all():
            bad = int(np.nonzero(~np.isfinite(out).all(axis=1))[0][0])
            raise EncoderError(f"the encoder returned non-finite values for item {offset + start + bad}")
        vectors.append(out)
        bar.update(len(batch))
    return np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


class ItemTable:
    """Distinct items in first-seen order: `add` returns an item's row, the same row for a repeat."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self._rows: dict[Item, int] = {}

    def add(self, item: Item) -> int:
        row = self._rows.get(item)
        if row is None:
            row = self._rows[item] = len(self.items)
            self.items.append(item)
        return row

    def __len__(self) -> int:
        return len(self.items)
