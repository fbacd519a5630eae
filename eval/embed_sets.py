"""Embed the named sets of a benchmark (its queries, its candidates, ...), each distinct item once.

Every task embeds two or more sets of items before it scores them; this is that step, written once: each set
goes through `embed_distinct` (and its cache), with a progress bar named after the dataset and the set, and
their encoding counts are summed. On Ray (`RayBackedEncoder`) all the sets go to the cluster in one job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from unime.eval.embedding import EmbedStats, RayBackedEncoder, embed_distinct, embed_sets_on_ray
from unime.eval.encoders import Encoder
from unime.inputs import Input


def embed_sets(
    encoder: Encoder,
    sets: Mapping[str, Sequence[Input]],
    *,
    dataset: str,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], EmbedStats]:
    """Vectors of each set, embedded in the mapping's order, and what their embedding took.

    Args:
        encoder: the model under evaluation.
        sets: label -> distinct items (e.g. `{"queries": ..., "candidates": ...}`); the label names the set in
            the progress bar and keys the result.
        dataset: the dataset's name, for the progress bars.
        batch_size: items per encoder call.
        cache_dir: the embedding cache shared across runs; None keeps nothing on disk.
        progress: whether to show a progress bar per set.

    Returns:
        label -> `[len(items), D]` float32, and the summed counts of every set.
    """
    if isinstance(encoder, RayBackedEncoder):
        return embed_sets_on_ray(encoder, sets, cache_dir=cache_dir)
    stats = EmbedStats()
    vectors: dict[str, np.ndarray] = {}
    for label, items in sets.items():
        vectors[label], set_stats = embed_distinct(
            encoder,
            items,
            batch_size=batch_size,
            cache_dir=cache_dir,
            progress=f"{dataset} {label}" if progress else None,
        )
        stats.add(set_stats)
    return vectors, stats
