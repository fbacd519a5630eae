"""Split one generation or mining job across machines: `--shard i/N` owns the records whose key hashes to i.

Ownership is decided by a stable hash (sha256) of a record's idempotent key, never by Python's `hash()` (salted
per process) nor by position in an input list (which shifts when inputs change), so the N shards of a job
partition its records exactly, on any machine, in any order, across reruns.

A thin fallback, kept on purpose: where a Ray cluster exists, the data jobs spread their model work over it
(`engine: ray`, `unime.ray_engine`), with retries and one embedding store. `--shard` serves machines that share no
Ray cluster (separate jobs on a scheduler without Ray, machines that only share a folder), and the synthetic
data generators, whose work is cheap per record and needs no model on every worker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from unime.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count` shards of one job."""

    index: int
    """Which shard this process is, 0 <= index < count."""
    count: int
    """How many shards split the job."""

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index}/{self.count}: need count >= 1 and 0 <= index < count")

    def owns(self, key: str) -> bool:
        """Whether the record with idempotent key `key` belongs to this shard."""
        if self.count == 1:
            return True
        return stable_hash(key) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL = Shard(0, 1)
"""The single shard that owns every record (no `--shard` given)."""


def stable_hash(key: str) -> int:
    """A 64-bit hash of `key` that is the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def parse_shard(spec: str | None) -> Shard:
    """Parse `"i/N"` (0-based i, e.g. `"0/4"` .. `"3/4"`) into a Shard; None or "" means the whole job."""
    if not spec:
        return ALL
    index_text, sep, count_text = spec.partition("/")
    try:
        if not sep:
            raise ValueError
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise ConfigError(f"--shard {spec!r}: expected 'i/N' with integers, e.g. '0/4'") from None
    return Shard(index, count)
