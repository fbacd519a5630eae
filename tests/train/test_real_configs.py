"""The real-backbone configs (recipes/configs/real/) validate, name registered backbones, and say how to launch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unime.backbones import get_backbone
from unime.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]
REAL = sorted((ROOT / "recipes" / "configs" / "real").glob("*.yaml"))


def test_every_family_and_stage_has_a_real_config() -> None:
    backbones = {load_train_config(path).model.backbone for path in REAL}
    assert {"qwen2_vl", "qwen2_5_vl", "llava"} <= backbones
    names = [path.name for path in REAL]
    assert sum("stage1" in n for n in names) >= 4 and sum("stage2" in n for n in names) >= 4
    assert any("reranker" in n for n in names)
    late_interaction = {c.model.backbone for c in map(load_train_config, REAL) if c.loss.name == "late_interaction"}
    assert {"qwen2_vl", "qwen3_vl"} <= late_interaction


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_config_validates_and_its_backbone_resolves(path: Path) -> None:
    config = load_train_config(path)
    spec = get_backbone(config.model.backbone)  # raises for an unregistered family
    source = config.model.name_or_path
    if not source.startswith("runs/"):  # a hub checkpoint: one the family serves
        assert source in spec.example_checkpoints, (source, spec.example_checkpoints)
    else:  # a model of an earlier stage, on the same base
        base = path.read_text().split("(base: ", 1)[1].split(")", 1)[0]
        assert base in spec.example_checkpoints
    if config.loss.name.startswith("rerank_"):
        assert config.model.kind == "reranker"
    if config.loss.name == "late_interaction":  # ColQwen's head: 128 dims, trained with a LoRA adapter
        assert config.model.multi_vector.enabled and config.model.multi_vector.dim == 128
    if config.loss.name == "text_distill_kl":
        assert config.distill.teacher != "sentence-transformers/all-MiniLM-L6-v2", "a real run needs a strong teacher"
    assert config.model.lora.enabled and config.optim.max_steps > 0
    header = path.read_text().split("\noutput_dir:", 1)[0]
    assert "Source:" in header and "GPUs:" in header and "accelerate launch" in header
    accelerate = header.split("--config_file ", 1)[1].split()[0]
    settings = yaml.safe_load((ROOT / accelerate).read_text())
    if settings.get("distributed_type") == "DEEPSPEED":
        assert config.optim.gradcache_chunk_size is None, "GradCache is refused under DeepSpeed ZeRO-2/3"
    assert f"recipes/configs/real/{path.name}" in header
