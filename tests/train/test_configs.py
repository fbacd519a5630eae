"""Every shipped config validates; bad keys and values fail with the file and the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unime.errors import ConfigError
from unime.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert any(path.name == "stage2_hardneg_instruct.yaml" for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path: Path) -> None:
    config = load_train_config(path)
    assert config.optim.max_steps > 0


def test_accelerate_configs_name_existing_deepspeed_files() -> None:
    for path in (ROOT / "recipes" / "accelerate").glob("*.yaml"):
        settings = yaml.safe_load(path.read_text())
        deepspeed = settings.get("deepspeed_config", {}).get("deepspeed_config_file")
        if deepspeed:
            assert (ROOT / deepspeed).is_file(), (path, deepspeed)
            assert "mixed_precision" not in settings, f"{path}: accelerate refuses mixed_precision beside DeepSpeed"


def test_overrides_are_typed_and_checked(tmp_path: Path) -> None:
    path = ROOT / "recipes" / "configs" / "stage2_hardneg_instruct.yaml"
    config = load_train_config(path, ["optim.lr=3e-4", "optim.gradcache_chunk_size=8", "loss.matryoshka_dims=[16,64]"])
    assert config.optim.lr == 3e-4 and config.optim.gradcache_chunk_size == 8
    assert config.loss.matryoshka_dims == [16, 64]
    assert load_train_config(path, ["optim.gradcache_chunk_size=null"]).optim.gradcache_chunk_size is None
    cases = [
        (["optim.lrr=1"], r"stage2_hardneg_instruct.yaml: unknown key\(s\) optim.lrr"),
        (["optim.max_steps=ten"], "optim.max_steps: expected int, got str 'ten'"),
        (["loss.name=triplet"], r"loss.name: expected one of \['info_nce', .*'rerank_sft', .*\], got 'triplet'"),
        (["data.train_files=a.jsonl"], "data.train_files: expected a list"),
        (["model.lora.r=true"], "model.lora.r: expected int, got bool"),
        (["optim"], "expected key.sub=value"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_train_config(path, overrides)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {batch_size: 8}\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) modle"):
        load_train_config(bad)
