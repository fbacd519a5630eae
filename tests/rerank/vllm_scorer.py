"""Child process for the vLLM reranker test: score pairs with the real vLLM engine, write the scores as JSON.

    python tests/rerank/vllm_scorer.py MODEL_DIR PAIRS_PICKLE OUT_JSON

vLLM runs here, never inside pytest (ENVIRONMENT.md: offline engines can abort at interpreter exit after their
results are out, so the parent judges this process by the file it writes).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def score_in_child(model_dir: str | os.PathLike, job: dict, work_dir: Path) -> dict[str, list[float]]:
    """Run this script on `job` (pairs, instruction, score_query, score_documents) in a child process; its scores.

    The child is judged by the file it writes, not by its exit status (see the module docstring)."""
    (work_dir / "pairs.pkl").write_bytes(pickle.dumps(job))
    out = work_dir / "scores.json"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(work_dir / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, __file__, str(model_dir), str(work_dir / "pairs.pkl"), str(out)]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), f"vLLM child wrote no scores (exit {process.returncode}):\n{process.stderr[-4000:]}"
    return json.loads(out.read_text())


def main(model_dir: str, pairs_path: str, out_path: str) -> None:
    from vllm import LLM

    from unime.vllm_compat import RerankPrompts, reranker_engine_kwargs

    with open(pairs_path, "rb") as handle:
        job = pickle.load(handle)
    prompts = RerankPrompts(model_dir)
    llm = LLM(**reranker_engine_kwargs(model_dir), enforce_eager=True, max_model_len=2048)
    # 1. Our prompts (any modality) through the classifier built from the yes/no rows.
    outputs = llm.classify(
        prompts.render(job["pairs"], job["instruction"]),
        tokenization_kwargs=prompts.tokenization_kwargs,
        use_tqdm=False,
    )
    classify = [float(output.outputs.probs[0]) for output in outputs]
    # 2. vLLM's own score API, rendering text pairs with the directory's judge template.
    with open(os.path.join(model_dir, "chat_template.jinja")) as handle:
        template = handle.read()
    scored = llm.score(job["score_query"], job["score_documents"], chat_template=template, use_tqdm=False)
    result = {"classify": classify, "score": [float(output.outputs.score) for output in scored]}
    with open(out_path + ".tmp", "w") as handle:
        json.dump(result, handle)
    os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
