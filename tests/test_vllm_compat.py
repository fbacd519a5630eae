"""The vLLM arguments that `unime.vllm_compat` derives from a model directory (no engine is started here)."""

from __future__ import annotations

import json

import pytest
import torch

import unime
from unime.errors import ConfigError
from unime.saving import save_model_directory
from unime.vllm_compat import EmbeddingPrompts, embedder_server_args, late_interaction_server_args


def test_vllm_accepts_any_truncation_like_unime_even_when_trained_dims_are_recorded(tmp_path):
    model = unime.build_tiny("qwen2_vl")
    model.config.matryoshka_dims = [16, 32]  # what a matryoshka run records
    save_model_directory(model, tmp_path / "model")
    args = embedder_server_args(tmp_path / "model", dtype="float32")
    overrides = json.loads(args[args.index("--hf-overrides") + 1])
    # vLLM refuses every `dimensions` outside a declared `matryoshka_dimensions` list; unime's encode, server and
    # sentence-transformers truncate to any size, so no list is declared.
    assert overrides == {"is_matryoshka": True}
    assert unime.load(tmp_path / "model").config.matryoshka_dims == [16, 32]


def test_a_qwen3_vl_multi_vector_directory_runs_on_colqwen3_sized_by_its_saved_weight(tmp_path):
    model = unime.build_tiny("qwen3_vl", multi_vector=unime.MultiVectorConfig())
    save_model_directory(model, tmp_path / "model")
    args = late_interaction_server_args(tmp_path / "model", dtype="float32")
    # No dimension key: ColQwen3 sizes its projection (and a bias, where one is saved) from the head's weight file.
    assert json.loads(args[args.index("--hf-overrides") + 1]) == {"architectures": ["ColQwen3"]}
    assert json.loads(args[args.index("--pooler-config") + 1]) == {"task": "token_embed"}
    # vLLM reads a sentence-transformers Dense it knows as a projection of its outputs: the token Dense is hidden.
    modules = json.loads((tmp_path / "model" / "modules.json").read_text())
    assert not {m["type"] for m in modules} & {"sentence_transformers.base.modules.dense.Dense"}
    with pytest.raises(ConfigError, match="multi-vector head, whose weight"):
        embedder_server_args(tmp_path / "model")


def test_late_interaction_refuses_what_vllm_cannot_serve_naming_it(tmp_path):
    unime.build_tiny("qwen2_vl", multi_vector=unime.MultiVectorConfig()).save(tmp_path / "qwen2")
    with pytest.raises(ConfigError, match="not 'qwen2_vl'"):
        late_interaction_server_args(tmp_path / "qwen2")
    unime.build_tiny("qwen3_vl").save(tmp_path / "single")
    with pytest.raises(ConfigError, match="has no multi-vector head"):
        late_interaction_server_args(tmp_path / "single")
    unime.build_tiny("qwen3_vl", multi_vector=unime.MultiVectorConfig(tokens="image")).save(tmp_path / "image")
    with pytest.raises(ConfigError, match="multi_vector.tokens is 'image'"):
        late_interaction_server_args(tmp_path / "image")


def test_kept_token_vectors_choose_the_tokens_unime_keeps(tmp_path):
    """vLLM returns a vector per prompt token; the rows kept are those `Embedder.encode` keeps, for both settings."""
    from PIL import Image

    from unime.inputs import parse_inputs

    for tokens in ("all", "image"):
        model = unime.build_tiny("qwen3_vl", multi_vector=unime.MultiVectorConfig(tokens=tokens))
        model.save(tmp_path / tokens)
        local = unime.load(tmp_path / tokens)
        prompts = EmbeddingPrompts(tmp_path / tokens)
        items = ["a red circle", Image.new("RGB", (96, 64), (200, 30, 30))]
        features = local.tokenize(parse_inputs(items))
        with torch.no_grad():
            head_input = local.embed_multi_vector(features)[0]  # [2, T, d]: every token's vector, padding included
        for row, expected in enumerate(local.encode(items, output="multi_vector")):
            real = features["attention_mask"][row].bool()
            kept = prompts.kept_token_vectors(head_input[row][real], features["input_ids"][row][real].tolist())
            torch.testing.assert_close(kept, torch.as_tensor(expected))
