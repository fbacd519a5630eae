"""The HTTP backend against real servers started as subprocesses: the same numbers as the model directory.

- `unime serve` (transformers backend) with `server="unime"`: batched items, roles as `input_type`;
- vLLM's own OpenAI server with `server="vllm"`: one chat-style `messages` request per item. The arguments come
  from `unime.vllm_compat.embedder_server_args` (pooling, normalisation, dtype) plus
  `--chat-template-content-format openai`: without it vLLM detects the "string" content format for unime's
  template, pastes the image placeholder into the text, and the template renders an image input as a text one
  (seen here: cosine 0.9985 instead of 1). The engine runs inside the server process (`--distributed-executor-backend
  uni`, `VLLM_ENABLE_V1_MULTIPROCESSING=0`), which starts it in less than half the time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serve.server_process import free_port, start_server
from unime.config import UnimeConfig
from unime.eval.encoders import EncoderError, HTTPEncoder
from unime.eval.items import Item
from unime.eval.runner import EvalConfig, run_eval
from unime.vllm_compat import embedder_server_args

API_KEY = "eval-key-0123"


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


def _probe_items(synthetic_root: Path) -> list[Item]:
    image = sorted((synthetic_root / "images").iterdir())[0]
    return [
        Item(text="a red circle on the left"),
        Item(image=image),
        Item(text="what is on the left?", image=image),
        Item(text="a blue square", role="query"),
        Item(image=image, role="document"),
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


@pytest.fixture(scope="module")
def vllm_server(tiny_dir, tmp_path_factory):
    """vLLM's OpenAI server on the tiny directory (one engine for the module)."""
    folder = tmp_path_factory.mktemp("vllm")
    port = free_port()
    args = embedder_server_args(tiny_dir, dtype="float32") + [
        "--chat-template-content-format",
        "openai",
        "--enforce-eager",
        "--distributed-executor-backend",
        "uni",
        "--max-model-len",
        "2048",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
    ]
    # The engine and its worker run inside the server process: each extra process re-imports vLLM and torch,
    # which took 45 s apiece on the loaded 2-core machine (startup 200 s -> 80 s).
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(folder / "cache"),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    log = open(folder / "vllm.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode}:\n{(folder / 'vllm.log').read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start in time:\n{(folder / 'vllm.log').read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        # The engine runs in child processes: end the whole group the server leads.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_server_gives_the_same_numbers(vllm_server, tiny_dir, tiny_encoder, synthetic_root, config, local_scores):
    prompts = UnimeConfig.load(tiny_dir).prompts
    encoder = HTTPEncoder(
        vllm_server,
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
        HTTPEncoder(vllm_server, model=str(tiny_dir), server="vllm", api_key="wrong").encode(items[:1])
