"""Tiny model directories for the server tests, built once per session."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def serve_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2-VL embedder (query and document instructions, matryoshka dims) and a tiny reranker."""
    import unime

    root = tmp_path_factory.mktemp("serve-models")
    embedder = unime.build_tiny("qwen2_vl", seed=0)
    embedder.config.prompts = dataclasses.replace(
        embedder.config.prompts,
        query_instruction="Find the image that matches the caption.",
        document_instruction="Represent the scene for retrieval.",
    )
    embedder.config.matryoshka_dims = [32, 16]
    embedder.save(root / "tiny-embedder")
    unime.save_tiny("qwen2_vl", root / "tiny-reranker", seed=1, kind="reranker")
    return {"embedder": root / "tiny-embedder", "reranker": root / "tiny-reranker"}


@pytest.fixture(scope="session")
def serve_inputs():
    """Drawn scenes and captions: texts, images of several sizes, text+image pairs."""
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    rng = random.Random(11)
    scenes = [random_scene(rng) for _ in range(4)]
    images = [draw_scene(scene) for scene in scenes]
    captions = [describe(scene) for scene in scenes]
    images[1] = images[1].resize((90, 60))
    images[2] = images[2].resize((150, 120))
    return images, captions


@pytest.fixture(scope="session")
def reference(serve_models):
    """`unime.load` of the embedder and the reranker: what every server's answers are compared with."""
    import unime

    return unime.load(serve_models["embedder"]), unime.load(serve_models["reranker"])


@pytest.fixture(scope="module")
def client(server):
    """A client of the module's `server`, with the key."""
    with server.client() as http:
        yield http


@pytest.fixture(scope="session")
def heavy_items(serve_inputs):
    """Eight text+image items: a request that keeps a tiny model busy for a while."""
    from tests.serve.server_process import data_url

    images, captions = serve_inputs
    return [{"text": captions[i % 4], "image": data_url(images[i % 4])} for i in range(8)]
