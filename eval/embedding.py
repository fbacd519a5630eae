"""Embed each distinct item once, reusing (and filling) an on-disk cache keyed by model and content.

The cache is unime's embedding store (`unime.embedding_store.EmbeddingStore`, the one the teacher cache and mining
use too), namespaced by the encoder's fingerprint and keyed by each item's content (`item_key`: text, image
bytes, role, instruction). Shards are written atomically every `shard_size` new vectors, so a run that is
interrupted resumes by embedding only what is missing. Without a cache folder the vectors stay in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from unime.embedding_store import EmbeddingStore, content_key
from unime.eval.encoders import Encoder
from unime.inputs import Input


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


def item_key(item: Input) -> str:
    """An item's key in the embedding store: equal for an equal text, equal image bytes, role and instruction (so
    moving a benchmark's images keeps its cache valid)."""
    return content_key(text=item.text, image=item.image, instruction=item.instruction, role=item.role)


def embed_distinct(
    encoder: Encoder,
    items: Sequence[Input],
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

    Raises:
        EmbeddingStoreError: when the encoder returns a wrong shape or non-finite values (naming the item), or the
            cache folder holds another layout or a damaged shard.
    """
    stats = EmbedStats(listed=len(items), distinct=len(items))
    bar = tqdm(total=len(items), desc=progress or "", unit="item", disable=progress is None, leave=False)
    try:
        store = EmbeddingStore(cache_dir, encoder.fingerprint, shard_size=shard_size)
        keys = [item_key(item) for item in items]
        bar.update(len(items) - len(store.missing(keys)))

        def encode(positions: list[int]) -> np.ndarray:
            vectors = encoder.encode([items[i] for i in positions], batch_size=batch_size)  # [b, D]
            bar.update(len(positions))
            return vectors

        stats.encoded = store.fill(
            keys, encode, batch_size=batch_size, source="the encoder", label=lambda i: f"item {i}", unit="items"
        )
        return store.get(keys), stats
    finally:
        bar.close()


class ItemTable:
    """Distinct items in first-seen order: `add` returns an item's row, the same row for a repeat."""

    def __init__(self) -> None:
        self.items: list[Input] = []
        self._rows: dict[Input, int] = {}

    def add(self, item: Input) -> int:
        row = self._rows.get(item)
        if row is None:
            row = self._rows[item] = len(self.items)
            self.items.append(item)
        return row

    def __len__(self) -> int:
        return len(self.items)
