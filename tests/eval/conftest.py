"""Fixtures of the evaluation tests: one small synthetic benchmark, one tiny model directory, one vLLM server.

When a vLLM test is selected, the server starts as soon as collection ends, so that its start-up (a minute or
more on a loaded 2-core machine) overlaps the other tests; the model directory it serves is the `tiny_dir` of
every test here.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.eval.vllm_server import VLLMServer
from unime.eval.embedding import item_key
from unime.eval.encoders import UnimeEncoder
from unime.eval.synthetic import write_synthetic_benchmark
from unime.inputs import Input

_EARLY: dict = {}


def save_tiny_dir(directory: Path) -> Path:
    """A tiny Qwen2-VL directory with a query instruction (as the suite-wide `tiny_dir`, seed 0)."""
    import unime

    base = unime.build_tiny("qwen2_vl", seed=0)
    config = copy.deepcopy(base.config)
    config.prompts.query_instruction = "Find the image that matches the caption."
    unime.Embedder(base.model, base.processor, config).save(directory)
    return directory


def pytest_collection_finish(session):
    here = Path(__file__).parent
    if any(item.get_closest_marker("vllm") and here in Path(item.fspath).parents for item in session.items):
        folder = Path(tempfile.mkdtemp(prefix="unime-eval-vllm-"))
        _EARLY["folder"] = folder
        _EARLY["server"] = VLLMServer(save_tiny_dir(folder / "tiny-qwen2-vl"), folder)


def pytest_sessionfinish(session, exitstatus):
    server = _EARLY.pop("server", None)
    if server is not None:
        server.stop()
    folder = _EARLY.pop("folder", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The model directory of these tests (the one the vLLM server serves when it runs)."""
    server = _EARLY.get("server")
    if server is not None:
        return server.model_dir
    return save_tiny_dir(tmp_path_factory.mktemp("eval-models") / "tiny-qwen2-vl")


@pytest.fixture(scope="session")
def vllm_server(tiny_dir, tmp_path_factory) -> VLLMServer:
    server = _EARLY.get("server")
    if server is None:  # run without collection's early start (e.g. a single test id): start it now
        server = _EARLY["server"] = VLLMServer(tiny_dir, tmp_path_factory.mktemp("vllm"))
    try:
        server.wait_ready(420)
    except RuntimeError as err:
        pytest.fail(str(err))
    return server


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

    def encode(self, items: list[Input], *, batch_size: int = 32):
        if self.fail_after is not None and len(self.encoded) + len(items) > self.fail_after:
            raise KeyboardInterrupt("interrupted on purpose")
        self.encoded += [item_key(item) for item in items]
        return self.inner.encode(items, batch_size=batch_size)
