"""A tiny reranker, built once for the rerank tests, and its saved directory."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_reranker():
    import unime

    return unime.build_tiny("qwen2_vl", seed=0, kind="reranker")


@pytest.fixture(scope="session")
def tiny_reranker_dir(tmp_path_factory, tiny_reranker):
    directory = tmp_path_factory.mktemp("models") / "tiny-reranker"
    tiny_reranker.save(directory)
    return directory


@pytest.fixture(scope="session")
def mixed_pairs(scenes):
    images, captions = scenes
    return [
        (captions[0], captions[1]),
        (captions[2], images[2]),
        (images[3], captions[3]),
        ({"text": "which shape is on the left?", "image": images[4]}, captions[4]),
        ("a much longer query " * 5, {"text": captions[5], "image": images[5].resize((90, 70))}),
        (captions[1], captions[1]),
    ]
