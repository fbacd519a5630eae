"""`unime.load`: model directories, plain checkpoints, LoRA adapters, options, and clear failures."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import unime
from unime.config import CONFIG_NAME, UnimeConfig


@pytest.fixture(scope="module")
def texts_and_images(scenes):
    images, captions = scenes
    return [captions[0], images[0], {"text": captions[1], "image": images[1]}]


@pytest.mark.parametrize("backbone", ["qwen2_vl", "qwen3_vl"])
def test_plain_hugging_face_checkpoint_loads_with_backbone_auto(
    backbone, tiny_embedders, tmp_path, texts_and_images
) -> None:
    embedder = tiny_embedders(backbone)
    embedder.hf_model.save_pretrained(tmp_path)
    embedder.processor.save_pretrained(tmp_path)
    assert not (tmp_path / CONFIG_NAME).exists()

    with pytest.raises(unime.ModelLoadError, match=f"has no {CONFIG_NAME}.*backbone='auto'"):
        unime.load(tmp_path)
    for requested in ("auto", backbone):
        loaded = unime.load(tmp_path, backbone=requested)
        assert loaded.config == UnimeConfig(backbone=backbone)
        assert type(loaded.processor).__name__ == embedder.spec.processor_class  # not the tokenizer alone
        np.testing.assert_allclose(loaded.encode(texts_and_images), embedder.encode(texts_and_images), atol=1e-6)
    refused = f"model_type '{backbone}', which backbone 'qwen2_5_vl' does not serve"
    with pytest.raises(unime.ModelLoadError, match=refused):
        unime.load(tmp_path, backbone="qwen2_5_vl")


def _with_trained_lora(embedder: unime.Embedder) -> unime.Embedder:
    """A copy with a LoRA adapter whose weights are not the identity (B != 0), as after training."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(embedder.hf_model),
        LoraConfig(r=4, lora_alpha=8, target_modules=embedder.spec.lora_target_modules),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return unime.Embedder(peft_model, copy.deepcopy(embedder.processor), copy.deepcopy(embedder.config))


def test_lora_adapter_saved_merged_or_beside_its_base(tiny_embedders, tmp_path, texts_and_images) -> None:
    base = tiny_embedders("qwen2_vl")
    base_dir = tmp_path / "base"
    base.save(base_dir)
    adapted = _with_trained_lora(unime.load(base_dir))
    expected = adapted.encode(texts_and_images)
    assert np.abs(expected - base.encode(texts_and_images)).max() > 1e-3  # the adapter changes the model

    adapted.save(tmp_path / "merged", merge_lora=True)
    merged = unime.load(tmp_path / "merged")
    assert not callable(getattr(merged.model, "get_base_model", None))
    np.testing.assert_allclose(merged.encode(texts_and_images), expected, atol=1e-5)
    assert callable(getattr(adapted.model, "get_base_model", None)), "saving merged must not merge the live model"

    adapted.save(tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["base_model"] == str(base_dir)
    beside = unime.load(tmp_path / "adapter")
    assert callable(getattr(beside.model, "get_base_model", None))
    np.testing.assert_allclose(beside.encode(texts_and_images), expected, atol=1e-5)
    np.testing.assert_allclose(
        unime.load(tmp_path / "adapter", merge_adapter=True).encode(texts_and_images), expected, atol=1e-5
    )

    # An adapter applied explicitly on top of its base.
    explicit = unime.load(base_dir, adapter=tmp_path / "adapter", merge_adapter=True)
    np.testing.assert_allclose(explicit.encode(texts_and_images), expected, atol=1e-5)


def test_dtype_device_and_attention_options(tiny_dir) -> None:
    assert unime.load(tiny_dir).hf_model.dtype == torch.float32  # "auto" on CPU
    bf16 = unime.load(tiny_dir, dtype="bfloat16", attn_implementation="eager", device="cpu")
    assert bf16.hf_model.dtype == torch.bfloat16
    assert bf16.hf_model.config._attn_implementation == "eager"
    assert bf16.encode("a red circle").dtype == np.float32
    with pytest.raises(unime.ModelLoadError, match="unknown dtype 'float13'"):
        unime.load(tiny_dir, dtype="float13")
    with pytest.raises(unime.ModelLoadError, match="attn_implementation 'fast'"):
        unime.load(tiny_dir, attn_implementation="fast")


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn installed")
def test_flash_attention_without_flash_attn_says_how_to_install(tiny_dir) -> None:
    with pytest.raises(unime.ModelLoadError, match=r"pip install 'unime\[flash\]'"):
        unime.load(tiny_dir, attn_implementation="flash_attention_2")


def test_bad_directories_and_configs_are_named(tiny_dir, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(unime.ModelLoadError, match=f"{empty} has no {CONFIG_NAME}"):
        unime.load(empty)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(unime.ModelLoadError, match="is a file"):
        unime.load(a_file)
    with pytest.raises(unime.ModelLoadError, match="says backbone 'qwen2_vl', but backbone='llava'"):
        unime.load(tiny_dir, backbone="llava")
    with pytest.raises(unime.UnimeError, match="unknown backbone 'nope'"):
        unime.load(empty, backbone="nope")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_NAME).write_text('{"backbone": "qwen2_vl", "poolin": "last"}')
    with pytest.raises(unime.ConfigError, match=r"unime_config.json: unknown field\(s\) poolin"):
        unime.load(broken)
    (broken / CONFIG_NAME).write_text('{"backbone": "qwen2_vl", "pooling": "max"}')
    with pytest.raises(unime.ConfigError, match="pooling: expected one of"):
        unime.load(broken)
    (broken / CONFIG_NAME).write_text("{not json")
    with pytest.raises(unime.ConfigError, match="not valid JSON"):
        unime.load(broken)
    (broken / CONFIG_NAME).write_text('{"backbone": "qwen2_vl", "prompts": {"query": "x"}}')
    with pytest.raises(unime.ConfigError, match=r"prompts\.query"):
        unime.load(broken)


def test_hub_names_that_cannot_be_fetched_fail_clearly() -> None:
    with pytest.raises(unime.ModelLoadError, match="Qwen/Qwen2-VL-2B-Instruct"):
        unime.load("Qwen/Qwen2-VL-2B-Instruct", backbone="auto")


def test_saving_over_an_existing_directory_replaces_it_whole(tiny_embedders, tmp_path) -> None:
    embedder = tiny_embedders("qwen2_vl")
    target = tmp_path / "model"
    embedder.save(target)
    (target / "stale.txt").write_text("from an older save")
    embedder.save(target)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or backup directories left
