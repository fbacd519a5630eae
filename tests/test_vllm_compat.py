"""The vLLM arguments that `unime.vllm_compat` derives from a model directory (no engine is started here)."""

from __future__ import annotations

import json

import unime
from unime.saving import save_model_directory
from unime.vllm_compat import embedder_server_args


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
