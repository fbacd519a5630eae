"""Every registered backbone: its tiny instance builds, embeds, saves, reloads, and its spec is right."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unime
from tests.conftest import mixed_inputs
from unime.backbones import backbone_for_model_type, get_backbone, list_backbones

BACKBONES = list_backbones()


def test_the_four_families_of_the_design_are_registered() -> None:
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "idefics3", "smolvlm"} <= set(BACKBONES)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tiny_backbone_embeds_saves_reloads_and_loads_in_sentence_transformers(
    backbone, tiny_embedders, scenes, tmp_path
) -> None:
    embedder = tiny_embedders(backbone)
    images, captions = scenes
    inputs = mixed_inputs(images, captions)
    vectors = embedder.encode(inputs, batch_size=3)
    assert vectors.shape == (len(inputs), embedder.embedding_dim)
    assert np.isfinite(vectors).all()
    # Batch-size invariance and input order on every backbone's padding and image handling.
    np.testing.assert_allclose(np.stack([embedder.encode(item) for item in inputs]), vectors, atol=1e-5)

    embedder.save(tmp_path / backbone)
    reloaded = unime.load(tmp_path / backbone)
    assert reloaded.config.backbone == backbone
    np.testing.assert_allclose(reloaded.encode(inputs, batch_size=3), vectors, atol=1e-6)

    # sentence-transformers, with its own modules, reads the same directory into the same vectors.
    from sentence_transformers import SentenceTransformer

    st_vectors = SentenceTransformer(str(tmp_path / backbone)).encode(inputs, batch_size=3)
    assert (st_vectors * vectors).sum(1).min() >= 0.9999


@pytest.mark.parametrize("backbone", BACKBONES)
def test_spec_paths_resolve_and_lora_targets_only_the_language_model(backbone, tiny_embedders) -> None:
    from peft import LoraConfig, get_peft_model

    spec = get_backbone(backbone)
    model = tiny_embedders(backbone).hf_model
    assert backbone_for_model_type(model.config.model_type) is spec
    assert type(model).__name__ == spec.model_class
    language_model = model.get_submodule(spec.language_model)
    vision_tower = model.get_submodule(spec.vision_tower)
    model.get_submodule(spec.projector)
    assert callable(getattr(model, spec.base_model))
    tokenizer_image_id = tiny_embedders(backbone).processor.tokenizer.convert_tokens_to_ids(spec.image_token)
    assert tokenizer_image_id == model.config.image_token_id

    import copy

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=spec.lora_target_modules))
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert adapted, "the LoRA regex matched nothing"
    language_prefix = f"base_model.model.{spec.language_model}."
    assert all(name.startswith(language_prefix) for name in adapted), adapted
    vision_params = {id(p) for p in vision_tower.parameters()}
    assert not any(id(p) in vision_params for p in language_model.parameters())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_tiny_builds_are_seeded(backbone) -> None:
    spec = get_backbone(backbone)
    (first, _), (second, _), (other, _) = spec.build_tiny(3), spec.build_tiny(3), spec.build_tiny(4)
    first, second, other = first.state_dict(), second.state_dict(), other.state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert any(not torch.equal(tensor, other[name]) for name, tensor in first.items())


def test_small_qwen2_vl_is_larger_and_embeds_like_the_tiny_one(scenes) -> None:
    # The benchmarks' compute-bound size: same tokenizer and processor, wider and deeper layers, valid M-RoPE.
    tiny, small = unime.build_tiny("qwen2_vl"), unime.build_tiny("qwen2_vl", size="small")
    assert small.embedding_dim == 384 and tiny.embedding_dim == 64
    assert sum(p.numel() for p in small.model.parameters()) > 50 * sum(p.numel() for p in tiny.model.parameters())
    images, captions = scenes
    inputs = mixed_inputs(images, captions)
    vectors = small.encode(inputs, batch_size=3)
    assert vectors.shape == (len(inputs), 384) and np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.stack([small.encode(item) for item in inputs]), vectors, atol=1e-5)
    with pytest.raises(ValueError, match="backbone 'llava' has no small builder"):
        unime.build_tiny("llava", size="small")


def test_unknown_backbones_are_named() -> None:
    with pytest.raises(unime.UnimeError, match="unknown backbone 'gpt5_vl'; registered backbones: .*qwen2_vl"):
        unime.build_tiny("gpt5_vl")
    with pytest.raises(unime.UnimeError, match="no registered backbone serves model_type 'bert'"):
        backbone_for_model_type("bert")
