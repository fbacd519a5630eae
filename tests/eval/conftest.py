"""Fixtures of the evaluation tests: one small synthetic benchmark and one tiny encoder per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from unime.eval.encoders import UnimeEncoder
from unime.eval.items import Item, content_key
from unime.eval.synthetic import write_synthetic_benchmark


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return write_synthetic_benchmark(tmp_path_factory.mktemp("eval-data") / "bench", seed=3, queries=6, candidates=5)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_dir) -> UnimeEncoder:
    """The saved tiny Qwen2-VL directory, loaded through unime.load."""
    return UnimeEncoder(tiny_dir)


class CountingEncoder:
    """A real encoder, recording the content of every item it is asked to embed; it can fail after a budget."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner = inner
        self.fail_after = fail_after
        self.encoded: list[str] = []

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def describe(self):
        return self.inner.describe()

    def encode(self, items: list[Item], *, batch_size: int = 32):
        if self.fail_after is not None and len(self.encoded) + len(items) > self.fail_after:
            raise KeyboardInterrupt("interrupted on purpose")
        self.encoded += [content_key(item) for item in items]
        return self.inner.encode(items, batch_size=batch_size)
