"""vLLM's own server on a single-vector (last-token) Qwen3-VL unime directory: the same vectors as `unime.load(dir)`.

One real vLLM OpenAI server per module, started from `unime.vllm_compat.embedder_server_args`; texts go as prompts
rendered by `EmbeddingPrompts`, images as `messages` rendered by the directory's template.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random

import httpx
import numpy as np
import pytest

from tests.eval.vllm_server import API_KEY, VLLMServer
from tests.serve.server_process import cosines, data_url
from unime.vllm_compat import EmbeddingPrompts

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

QUERY = "Find the image that matches the caption."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import unime

    directory = tmp_path_factory.mktemp("qwen3-vl-embedder") / "tiny-qwen3-vl"
    embedder = unime.build_tiny("qwen3_vl", seed=2)
    embedder.config.prompts = dataclasses.replace(embedder.config.prompts, query_instruction=QUERY)
    embedder.save(directory)
    return directory


@pytest.fixture(scope="module")
def vllm(model_dir, tmp_path_factory):
    server = VLLMServer(model_dir, tmp_path_factory.mktemp("vllm-qwen3-vl"))
    try:
        server.wait_ready(timeout=600)
        yield server
    finally:
        server.stop()


def embeddings(server: VLLMServer, payload: dict) -> np.ndarray:
    body = {"model": str(server.model_dir), **payload}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(server.url + "/v1/embeddings", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, f"{response.text}\n{server.log()}"
    return np.asarray([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def test_pooled_vectors_of_texts_and_images_equal_unime_encode(vllm, model_dir):
    import unime
    from unime.data_synth.scenes import describe, draw_scene, random_scene

    scenes = [random_scene(random.Random(seed)) for seed in range(3)]
    images, captions = [draw_scene(scene) for scene in scenes], [describe(scene) for scene in scenes]
    images[1] = images[1].resize((120, 90))
    local = unime.load(model_dir)
    rendered = [prompt["prompt"] for prompt in EmbeddingPrompts(model_dir).render(captions, QUERY)]
    texts = embeddings(vllm, {"input": rendered})
    assert texts.shape == (len(captions), local.embedding_dim)
    assert cosines(texts, local.encode_query(captions)).min() >= 0.9999
    for image, expected in zip(images, local.encode(images), strict=True):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]}]
        assert cosines(embeddings(vllm, {"messages": messages}), expected[None]).min() >= 0.9999
