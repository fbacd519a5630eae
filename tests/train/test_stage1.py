"""Stage 1 end to end: distilling the real MiniLM teacher into a tiny MLLM's language model, then stage 2 on top."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unime
from tests.train.recipes import recipe_main
from unime.data.dataset import load_examples
from unime.data_synth.pairs import write_image_caption_pairs
from unime.train.config import load_train_config
from unime.train.evaluation import retrieval_recall, teacher_agreement
from unime.train.teacher import TeacherCache

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "recipes" / "configs" / "stage1_text_distill.yaml"
STAGE2 = ROOT / "recipes" / "configs" / "stage2_hardneg_instruct.yaml"


@pytest.mark.slow
def test_stage1_moves_the_student_towards_the_teacher(stage1_text_pairs, stage1_run) -> None:
    final, cache_dir = stage1_run
    held_out, _ = load_examples([stage1_text_pairs["held_out"]])
    config = load_train_config(STAGE1)
    cache = TeacherCache(cache_dir, config.distill.teacher)
    assert all(e.query.text in cache and e.positive.text in cache for e in held_out)  # filled by the recipe

    before_model, after_model = unime.build_tiny("qwen2_vl"), unime.load(final)
    before = {**retrieval_recall(before_model, held_out), "spearman": teacher_agreement(before_model, held_out, cache)}
    after = {**retrieval_recall(after_model, held_out), "spearman": teacher_agreement(after_model, held_out, cache)}
    teacher_recall = _teacher_recall(cache, held_out)
    # Measured: Spearman with the teacher 0.42 -> 0.94, recall@1 0.00 -> 0.23 (the teacher itself: 0.12);
    # chance recall@1 is 0.01.
    assert after["spearman"] >= before["spearman"] + 0.3, (before, after)
    assert after["recall@1"] >= max(0.15, before["recall@1"] + 0.1), (before, after, teacher_recall)


def _teacher_recall(cache: TeacherCache, examples) -> float:
    q = cache.lookup([e.query.text for e in examples])
    p = cache.lookup([e.positive.text for e in examples])
    scores = q @ p.T
    return float((scores.argmax(1) == torch.arange(len(examples))).float().mean())


@pytest.mark.slow
def test_stage2_starts_from_the_stage1_model(stage1_run, tmp_path: Path) -> None:
    final, _ = stage1_run
    shapes = write_image_caption_pairs(tmp_path / "shapes", train=16, held_out=4, seed=0)
    out = recipe_main()(
        [
            "--config",
            str(STAGE2),
            f"model.name_or_path={final}",
            f"data.train_files=[{shapes['train']}]",
            "data.eval_files=[]",
            f"output_dir={tmp_path / 'stage2'}",
            "optim.batch_size=8",
            "optim.max_steps=3",
            "log_with=[]",
            "save_every=0",
        ]
    )
    start, trained = unime.load(final), unime.load(out)
    texts = ["a red circle on the left"]
    assert trained.config.backbone == "qwen2_vl"
    assert abs(trained.encode(texts) - start.encode(texts)).max() > 1e-4
