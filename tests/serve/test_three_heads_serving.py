"""`unime serve` hosting a multi-task directory as both the embedder and the reranker: one loaded model whose heads
share its weights, answering pooled vectors, token matrices and yes/no scores equal to `unime.load(dir)`'s."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serve.server_process import cosines, data_url, embed, start_server
from unime.config import MultiVectorConfig
from unime.multi_task import build_tiny_multi_task
from unime.serve.config import ServeConfig
from unime.serve.lifecycle import load_models

MODEL = "three-heads"
RERANKER = "three-heads-judge"


@pytest.fixture(scope="module")
def three_heads_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve-three-heads") / MODEL
    build_tiny_multi_task("qwen2_vl", seed=2, multi_vector=MultiVectorConfig(dim=16)).save(directory)
    return directory


@pytest.fixture(scope="module")
def local(three_heads_dir):
    import unime

    return unime.load(three_heads_dir)


def test_one_directory_named_twice_is_loaded_once(three_heads_dir) -> None:
    config = ServeConfig(embedder_dir=str(three_heads_dir), reranker_dir=str(three_heads_dir), backend="transformers")
    loaded = load_models(config)
    embedder, reranker = loaded["embedder"].model, loaded["reranker"].model
    assert embedder.model is reranker.model  # one backbone behind both hosted kinds
    assert [p.data_ptr() for p in embedder.model.parameters()] == [p.data_ptr() for p in reranker.model.parameters()]
    assert loaded["embedder"].multi_vector_dim == 16


@pytest.mark.slow
def test_the_server_answers_every_head_as_unime_load_does(three_heads_dir, local, serve_inputs, tmp_path) -> None:
    images, captions = serve_inputs
    args = [str(three_heads_dir), "--reranker", str(three_heads_dir), "--reranker-served-model-name", RERANKER]
    server = start_server([*args, "--backend", "transformers"], tmp_path / "three-heads.log", timeout=120)
    try:
        with server.client() as client:
            served = [captions[0], {"image": data_url(images[1])}]
            items = [captions[0], images[1]]
            vectors = embed(client, {"input": served, "model": MODEL})
            assert cosines(vectors, local.encode(items)).min() >= 0.9999
            response = client.post("/v1/embeddings", json={"input": served, "model": MODEL, "output": "multi_vector"})
            assert response.status_code == 200, response.text
            for row, expected in zip(response.json()["data"], local.encode(items, output="multi_vector"), strict=True):
                matrix = np.asarray(row["embedding"], dtype=np.float32)
                assert matrix.shape == expected.shape and cosines(matrix, expected).min() >= 0.9999
            documents = [captions[1], {"image": data_url(images[0])}, captions[0]]
            response = client.post("/v1/rerank", json={"query": captions[0], "documents": documents, "model": RERANKER})
            assert response.status_code == 200, response.text
            scores = {row["index"]: row["relevance_score"] for row in response.json()["results"]}
            expected = local.predict([(captions[0], captions[1]), (captions[0], images[0]), (captions[0], captions[0])])
            np.testing.assert_allclose([scores[i] for i in range(3)], expected, atol=1e-4)
    finally:
        assert server.stop() == 0, server.log()
