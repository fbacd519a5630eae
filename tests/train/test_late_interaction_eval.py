"""The in-training retrieval check of a late-interaction run scores held-out drawn pages by MaxSim of token matrices:
the same numbers as a naive per-pair computation, and the recipe logs them when `data.eval_files` is set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import unime
from tests.train.recipes import ROOT, recipe_main
from unime.config import MultiVectorConfig
from unime.data.dataset import load_examples
from unime.data_synth.pages import PagesSynthConfig, write_pages
from unime.multi_vector import add_multi_vector_head
from unime.train.evaluation import held_out_scores, retrieval_recall

CONFIG = ROOT / "recipes" / "configs" / "late_interaction_visdoc.yaml"


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, list[Path]]:
    """Drawn pages (small, so that a page is a few dozen tokens): train and held-out splits sharing no page."""
    result = write_pages(
        tmp_path_factory.mktemp("pages"),
        PagesSynthConfig(train=8, held_out=6, negatives=2, seed=7, width=192, height=256),
    )
    return {split: result.shard_paths(split) for split in ("train", "held_out")}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return add_multi_vector_head(unime.build_tiny("qwen2_vl"), MultiVectorConfig(dim=16), seed=0)


def _alone(model, side) -> torch.Tensor:
    """One side's token matrix `[n, d]`, encoded by itself (no batch, no padding)."""
    with torch.inference_mode():
        vectors, mask = model.embed_multi_vector(model.tokenize([side], [side.instruction]))  # [1, T, d], [1, T]
    return vectors[0][mask[0]].float()  # [n, d]


def _naive_maxsim(query: torch.Tensor, document: torch.Tensor) -> float:
    return float((query @ document.T).max(dim=1).values.sum())  # [nq, nd] -> best per query token, summed


def test_multi_vector_recall_equals_a_naive_per_pair_maxsim(pages, model) -> None:
    examples, _ = load_examples(pages["held_out"])
    queries = [_alone(model, e.query) for e in examples]
    positives = [_alone(model, e.positive) for e in examples]
    expected = torch.tensor([[_naive_maxsim(q, p) for p in positives] for q in queries])  # [N, N]
    expected_negatives = torch.tensor(
        [_naive_maxsim(queries[i], _alone(model, n)) for i, e in enumerate(examples) for n in e.negatives]
    )  # [P]

    scores = held_out_scores(model, examples, batch_size=4, multi_vector=True)
    torch.testing.assert_close(scores.positives, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(scores.negatives, expected_negatives, atol=1e-4, rtol=1e-5)

    n = len(examples)
    ranks = [sum(bool(expected[i, j] > expected[i, i]) for j in range(n)) for i in range(n)]
    wins = [
        bool(expected_negatives[k] < expected[i, i])
        for k, i in enumerate(i for i, e in enumerate(examples) for _ in e.negatives)
    ]
    assert retrieval_recall(model, examples, batch_size=4, multi_vector=True) == pytest.approx(
        {
            "recall@1": sum(r < 1 for r in ranks) / n,
            "recall@5": sum(r < 5 for r in ranks) / n,
            "hard_negative_accuracy": sum(wins) / len(wins),
        }
    )
    # MaxSim over token matrices, not the pooled vector: the single-vector scores are other numbers.
    single = held_out_scores(model, examples, batch_size=4)
    assert not torch.allclose(single.positives, expected, atol=1e-2)
    with pytest.raises(ValueError, match="truncate_dim applies to single vectors"):
        held_out_scores(model, examples, truncate_dim=8, multi_vector=True)


@pytest.mark.slow
def test_the_late_interaction_recipe_logs_maxsim_metrics_on_held_out_pages(pages, tmp_path: Path, capsys) -> None:
    final = recipe_main()(
        [
            "--config",
            str(CONFIG),
            f"data.train_files=[{','.join(map(str, pages['train']))}]",
            f"data.eval_files=[{','.join(map(str, pages['held_out']))}]",
            f"output_dir={tmp_path / 'run'}",
            "model.multi_vector.dim=16",
            "data.num_negatives=2",
            "optim.batch_size=4",
            "optim.max_steps=2",
            "eval_every=1",
            "log_with=[]",
            "save_every=0",
        ]
    )
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("final evaluation: "))
    logged = {k: float(v) for k, v in re.findall(r"(\S+) ([0-9.]+)", line.removeprefix("final evaluation: "))}
    assert set(logged) == {"recall@1", "recall@5", "hard_negative_accuracy"}
    # The logged numbers are the saved model's MaxSim metrics on the held-out pages.
    held_out, _ = load_examples(pages["held_out"])
    measured = retrieval_recall(unime.load(final), held_out, multi_vector=True)
    assert logged == pytest.approx(measured, abs=1e-4)
