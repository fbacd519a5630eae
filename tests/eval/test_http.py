"""The HTTP backend against real servers started as subprocesses: the same numbers as the model directory.

- `unime serve` (transformers backend) with `server="unime"`: batched items, roles as `input_type`;
- vLLM's own OpenAI server with `server="vllm"`: one chat-style `messages` request per item (flags and why in
  `tests/eval/vllm_server.py`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.eval.vllm_server import API_KEY
from tests.serve.server_process import start_server
from unime.config import UnimeConfig
from unime.eval.encoders import EncoderError, HTTPEncoder
from unime.eval.runner import EvalConfig, run_eval
from unime.inputs import Input


def _all_scores(results) -> dict[str, float]:
    flat = {}
    for row in results["tasks"]["mmeb"]["datasets"]:
        flat.update({f"{row['dataset']}/{k}": v for k, v in row["scores"].items()})
    for task in results["tasks"]["retrieval"]:
        flat.update({f"retrieval/{k}": v for k, v in task["scores"].items()})
    return flat


@pytest.fixture(scope="module")
def config(synthetic_root) -> EvalConfig:
    # Text, image and text+image queries; text, image and crop candidates; a corpus task with roles.
    return EvalConfig(
        mmeb_root=str(synthetic_root),
        mmeb_datasets=["Synthetic-VQA", "Synthetic-T2I", "Synthetic-Grounding"],
        retrieval=[str(synthetic_root / "retrieval" / "test.json")],
        progress=False,
    )


@pytest.fixture(scope="module")
def local_scores(tiny_encoder, config) -> dict[str, float]:
    return _all_scores(run_eval(tiny_encoder, config))


def _probe_items(synthetic_root: Path) -> list[Input]:
    image = sorted((synthetic_root / "images").iterdir())[0]
    return [
        Input(text="a red circle on the left"),
        Input(image=image),
        Input(text="what is on the left?", image=image),
        Input(text="a blue square", role="query"),
        Input(image=image, role="document"),
    ]


@pytest.mark.slow
def test_unime_server_gives_the_same_numbers(tiny_dir, tiny_encoder, synthetic_root, config, local_scores, tmp_path):
    server = start_server(
        [str(tiny_dir), "--backend", "transformers", "--served-model-name", "tiny"], tmp_path / "serve.log", timeout=180
    )
    try:
        encoder = HTTPEncoder(server.url, model="tiny", server="unime", api_key=server.api_key)
        items = _probe_items(synthetic_root)
        np.testing.assert_allclose(encoder.encode(items, batch_size=2), tiny_encoder.encode(items), atol=1e-5)
        remote = _all_scores(run_eval(encoder, config))
        assert remote.keys() == local_scores.keys()
        for key, value in local_scores.items():
            assert remote[key] == pytest.approx(value, abs=1e-6), key
        with pytest.raises(EncoderError, match="HTTP 401"):
            HTTPEncoder(server.url, model="tiny", server="unime", api_key="wrong").encode(items[:1])
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_server_gives_the_same_numbers(vllm_server, tiny_dir, tiny_encoder, synthetic_root, config, local_scores):
    prompts = UnimeConfig.load(tiny_dir).prompts
    encoder = HTTPEncoder(
        vllm_server.url,
        model=str(tiny_dir),
        server="vllm",
        api_key=API_KEY,
        query_instruction=prompts.query_instruction or None,
        document_instruction=prompts.document_instruction or None,
    )
    items = _probe_items(synthetic_root)
    np.testing.assert_allclose(encoder.encode(items), tiny_encoder.encode(items), atol=1e-5)
    remote = _all_scores(run_eval(encoder, config))
    for key, value in local_scores.items():
        assert remote[key] == pytest.approx(value, abs=1e-6), key
    with pytest.raises(EncoderError, match="HTTP 401"):
        HTTPEncoder(vllm_server.url, model=str(tiny_dir), server="vllm", api_key="wrong").encode(items[:1])
