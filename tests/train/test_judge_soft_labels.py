"""The soft-label stage-2 config on rows mined with a judge: the judge's scores, written by the miner into the rows'
`scores`, are what the embedder learns from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import unime
from tests.train.recipes import RECIPES, recipe_main
from unime.data.dataset import load_examples
from unime.data_synth.mining.miner import MiningConfig, mine_file
from unime.train.config import load_train_config
from unime.train.evaluation import retrieval_recall
from unime.train.teacher import TeacherCache

CONFIG = RECIPES / "configs" / "stage2_judge_soft_labels.yaml"


class TeacherJudge:
    """The stage-1 teacher (MiniLM) as the judge: the cosine of its cached embeddings of a query and a document.

    A real text model whose embeddings the stage-1 run has already cached, so judging costs no forward pass; a
    reranker trained for the purpose takes longer than this test may, and a random tiny one scores noise.
    """

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def predict(self, pairs, *, batch_size: int = 32, show_progress_bar: bool | None = None) -> np.ndarray:
        queries = self.cache.lookup([query for query, _ in pairs])  # [N, Dt], L2-normalised
        documents = self.cache.lookup([document for _, document in pairs])  # [N, Dt]
        return (queries * documents).sum(dim=1).numpy()  # [N]


@pytest.fixture(scope="module")
def judged_rows(stage1_run, stage1_text_pairs, tmp_path_factory) -> tuple[Path, TeacherJudge]:
    """The paraphrase corpus's training rows, mined by the stage-1 model and scored by the judge."""
    stage1, cache_dir = stage1_run
    judge = TeacherJudge(TeacherCache(cache_dir, load_train_config(CONFIG).distill.teacher))
    # The default margin (0) drops only candidates the embedder ranks above the positive, whatever the margin's sign.
    out, manifest = mine_file(
        unime.load(stage1),
        stage1_text_pairs["train"],
        tmp_path_factory.mktemp("judged") / "train.jsonl",
        MiningConfig(top_k=10, negatives=3),
        model_id="stage1",
        judge=judge,
        judge_id="minilm-teacher",
    )
    assert manifest.details["judge"] == "minilm-teacher" and manifest.details["dropped_by_judge"] > 0
    return out, judge


def _train(rows: Path, start: Path, output_dir: Path) -> Path:
    return recipe_main()(
        [
            "--config",
            str(CONFIG),
            f"model.name_or_path={start}",
            f"data.train_files=[{rows}]",
            "data.eval_files=[]",
            f"output_dir={output_dir}",
            "optim.max_steps=60",
            "optim.batch_size=8",
            "log_with=[]",
            "save_every=0",
        ]
    )


def test_the_config_distils_judge_scores_with_the_soft_label_loss() -> None:
    config = load_train_config(CONFIG)
    assert config.loss.name == "soft_label_kl" and config.data.num_negatives > 0
    header = CONFIG.read_text().split("\noutput_dir:", 1)[0]
    assert "unime mine" in header and "--judge" in header and f"recipes/configs/{CONFIG.name}" in header


@pytest.mark.slow
def test_soft_labels_from_a_judge_lift_held_out_retrieval_far_above_chance(
    judged_rows, stage1_run, stage1_text_pairs, tmp_path
) -> None:
    rows, judge = judged_rows
    examples, _ = load_examples([rows], on_error="skip")
    scored = [e for e in examples if e.negatives][:5]
    for example in scored:  # the rows carry the judge's scores of [positive, *negatives]
        pairs = [(example.query.text, side.text) for side in (example.positive, *example.negatives)]
        np.testing.assert_allclose(example.scores, judge.predict(pairs), atol=1e-5)

    # The same rows with every score equal: a uniform target, so whatever is learned comes from the scores.
    flat = tmp_path / "flat" / "train.jsonl"
    flat.parent.mkdir()
    with rows.open() as source, flat.open("w") as target:
        for line in source:
            row = json.loads(line)
            row["scores"] = [0.5] * len(row["scores"])
            target.write(json.dumps(row) + "\n")

    stage1, _ = stage1_run
    held_out, _ = load_examples([stage1_text_pairs["held_out"]])
    before = retrieval_recall(unime.load(stage1), held_out)
    after = retrieval_recall(unime.load(_train(rows, stage1, tmp_path / "judged")), held_out)
    uniform = retrieval_recall(unime.load(_train(flat, stage1, tmp_path / "uniform")), held_out)
    chance = 1 / len(held_out)
    # Measured with these seeds (100 held-out pairs, chance 0.01): recall@1 0.23 for the stage-1 model, 0.71 after
    # 60 steps on the judge's scores, 0.04 on the uniform ones (the embeddings collapse).
    assert after["recall@1"] >= max(40 * chance, before["recall@1"] + 0.2), (before, after)
    assert uniform["recall@1"] <= after["recall@1"] - 0.3, (uniform, after)
