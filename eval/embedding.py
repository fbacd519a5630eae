"""Embed each distinct item once, reusing (and filling) an on-disk cache keyed by model and content.

The cache is unime's embedding store (`unime.embedding_store.EmbeddingStore`, the one the teacher cache and mining
use too), namespaced by the encoder's fingerprint and keyed by each item's content (`item_key`: text, image
bytes, role, instruction). Shards are written atomically every `shard_size` new vectors, so a run that is
interrupted resumes by embedding only what is missing. Without a cache folder the vectors stay in memory.

A `RayBackedEncoder` (`unime eval run --engine ray`) embeds what the cache lacks on a Ray cluster instead: one Ray
job per dataset (all its sets of items together, `embed_sets_on_ray`), each actor holding its own copy of the model
(`UnimeEncoderFactory`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from unime.embedding_store import EmbeddingStore, content_key
from unime.eval.encoders import Encoder, UnimeEncoder
from unime.inputs import Input
from unime.ray_engine import Encode, RayEncoding


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
    if isinstance(encoder, RayBackedEncoder):
        vectors, stats = embed_sets_on_ray(encoder, {"items": items}, cache_dir=cache_dir, shard_size=shard_size)
        return vectors["items"], stats
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


def embed_sets_on_ray(
    encoder: RayBackedEncoder,
    sets: Mapping[str, Sequence[Input]],
    *,
    cache_dir: str | Path | None = None,
    shard_size: int = 1024,
) -> tuple[dict[str, np.ndarray], EmbedStats]:
    """Vectors of each set of distinct items (label -> items), what the cache lacks embedded in ONE Ray job.

    One job for all the sets, not one per set: every job starts its actor pool and loads the model in each actor
    (seconds to minutes), which would otherwise be paid again for the queries, the candidates, ... of a dataset.
    An item in several sets (a caption as query and as document has another role, so another key; an image listed
    twice has one) is embedded once. Ray shows the job's progress.

    Returns:
        label -> `[len(items), D]` float32, and what was encoded.
    """
    store = EmbeddingStore(cache_dir, encoder.fingerprint, shard_size=shard_size)
    names = [(label, index) for label, items in sets.items() for index in range(len(items))]
    items = [item for set_items in sets.values() for item in set_items]
    keys = [item_key(item) for item in items]
    listed = len(items)
    encoded = encoder.ray.fill(
        store, keys, items, source="the encoder", label=lambda i: f"{names[i][0]} item {names[i][1]}", unit="items"
    )
    vectors, start = {}, 0
    for label, set_items in sets.items():
        vectors[label] = store.get(keys[start : start + len(set_items)])  # [len(set_items), D]
        start += len(set_items)
    return vectors, EmbedStats(listed=listed, distinct=listed, encoded=encoded)


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


@dataclass
class UnimeEncoderFactory:
    """Builds a `UnimeEncoder` in each Ray actor (`unime.ray_engine.EncoderFactory`): the model loaded once, by
    path, with the evaluation's settings."""

    model: str
    """The model directory or hub name (every node of the cluster must reach it)."""
    truncate_dim: int | None = None
    """Matryoshka truncation, as `UnimeEncoder` takes it."""
    batch_size: int = 32
    """Items per forward pass."""

    def __call__(self) -> Encode:
        return functools.partial(
            UnimeEncoder(self.model, truncate_dim=self.truncate_dim).encode, batch_size=self.batch_size
        )


class RayBackedEncoder:
    """An encoder whose benchmark items are embedded on a Ray cluster by `embed_distinct` (what the cache lacks goes
    to `ray`'s actor pool, inside `unime.ray_engine.ray_cluster`). Everything else (fingerprint, so the same cache;
    token matrices, which are not cached) is the local encoder's."""

    def __init__(self, local: Encoder, ray: RayEncoding) -> None:
        self.local = local
        self.ray = ray

    @property
    def fingerprint(self) -> str:
        return self.local.fingerprint

    def describe(self) -> dict[str, Any]:
        return {**self.local.describe(), "engine": "ray"}

    def encode(self, items: Sequence[Input], *, batch_size: int = 32) -> np.ndarray:
        return self.local.encode(items, batch_size=batch_size)

    def __getattr__(self, name: str) -> Any:
        # The local encoder's other abilities (has_multi_vector, encode_multi_vector) stay visible.
        return getattr(self.local, name)
