"""Batch order for training: shuffled, optionally one source per batch, resumable at any batch."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence


class TrainBatchSampler:
    """Yields lists of example indices; the order is a pure function of (seed, epoch).

    With `same_source=True` every batch holds examples of one source only (VLM2Vec does this): in-batch
    negatives from another task are easy, so mixed batches teach little. `drop_last` keeps every batch full,
    which cross-process gathering and a fixed number of hard negatives per batch rely on. `skip_batches`
    resumes inside an epoch without replaying or losing a batch.
    """

    def __init__(
        self,
        sources: Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        same_source: bool = False,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.seed = seed
        self.same_source = same_source
        self.drop_last = drop_last
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{epoch}")
        groups: dict[str, list[int]] = defaultdict(list)
        for index, source in enumerate(self.sources):
            groups[source if self.same_source else ""].append(index)
        batches: list[list[int]] = []
        for key in sorted(groups):
            indices = groups[key]
            rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip_batches :]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.skip_batches
