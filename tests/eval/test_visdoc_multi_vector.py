"""Visual-document retrieval scored by MaxSim of token matrices, beside single vectors: the scores against a naive
per-pair loop, the ViDoRe-style metrics against a hand computation, `both` against the two single runs, and the
`unime eval run --visdoc-scoring both` command end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import unime
from unime.cli import main
from unime.data_synth.pages import PagesSynthConfig, plan, write_visdoc_beir
from unime.errors import ConfigError
from unime.eval.encoders import UnimeEncoder
from unime.eval.report import task_rows, to_markdown
from unime.eval.runner import EvalConfig, run_eval
from unime.eval.scoring import positions_in_list
from unime.eval.visdoc import load_visdoc, multi_vector_scores, ranks_from_scores, run_visdoc, visdoc_scores

WIDTH, HEIGHT = 192, 256  # small pages (a few hundred tokens on the tiny model), as the generator's own tests draw


@pytest.fixture(scope="module")
def pages_dir(tmp_path_factory) -> Path:
    """A BEIR folder of drawn pages: 4 held-out queries, each with its page and 2 pages differing in its fact."""
    queries = list(plan(PagesSynthConfig(train=0, held_out=4, negatives=2, seed=5, width=WIDTH, height=HEIGHT)))
    return write_visdoc_beir(queries, tmp_path_factory.mktemp("pages") / "visdoc", width=WIDTH, height=HEIGHT)


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-VL directory with a multi-vector head."""
    model = unime.build_tiny("qwen2_vl", seed=0, multi_vector=unime.MultiVectorConfig())
    directory = tmp_path_factory.mktemp("models") / "tiny-multi-vector"
    model.save(directory)
    return directory


@pytest.fixture(scope="module")
def multi_encoder(multi_dir) -> UnimeEncoder:
    return UnimeEncoder(multi_dir)


def _naive_maxsim(query: np.ndarray, page: np.ndarray) -> float:
    """sum over query tokens of the best dot product with any page token, one pair at a time."""
    return float(sum(max(float(q @ d) for d in page) for q in query))


def test_multi_vector_scores_equal_a_naive_per_pair_maxsim(multi_encoder, pages_dir, tmp_path):
    dataset = load_visdoc(pages_dir, image_dir=tmp_path)
    scores = multi_vector_scores(multi_encoder, dataset, batch_size=3).numpy()  # [Q, N]
    # Each item encoded alone, with its role's instruction, then every pair scored by a Python loop.
    model = multi_encoder.model
    pages = [model.encode(p.to_dict(), prompt_name="document", output="multi_vector") for p in dataset.pages]
    queries = [model.encode(q.to_dict(), prompt_name="query", output="multi_vector") for q in dataset.queries]
    naive = np.array([[_naive_maxsim(q, p) for p in pages] for q in queries])
    assert scores.shape == (len(dataset.queries), len(dataset.pages)) == (4, 12)
    np.testing.assert_allclose(scores, naive, rtol=1e-5, atol=1e-4)
    # The reported numbers are those of ranking by these scores: a full sort of each row, relevant page located.
    result, stats = run_visdoc(multi_encoder, pages_dir, scoring="multi_vector", progress=False)
    positions = []
    for row, judged in zip(naive, dataset.relevant, strict=True):
        order = sorted(range(len(row)), key=lambda page: -row[page])
        positions.append(np.array([1.0 + order.index(page) for page in judged]))
    gains = [list(judged.values()) for judged in dataset.relevant]
    assert result["scores_by_scoring"] == {"multi_vector": pytest.approx(visdoc_scores(positions, gains))}
    assert result["scores"] == result["scores_by_scoring"]["multi_vector"] and result["scoring"] == ["multi_vector"]
    assert (stats.listed, stats.encoded) == (16, 16)


def test_ndcg_and_recall_equal_a_hand_computation():
    # 3 queries x 8 pages. q0: its one relevant page second. q1: relevant pages 0 (gain 2) first and 3 (gain 1)
    # fourth. q2: relevant page 7 below five pages and tied with one more, and a tie counts against it: 7th.
    scores = torch.tensor(
        [
            [9.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [9.0, 8.0, 7.0, 5.0, 1.0, 1.0, 1.0, 1.0],
            [9.0, 8.0, 7.0, 6.0, 5.0, 2.0, 1.0, 2.0],
        ]
    )
    relevant = [{1: 1.0}, {0: 2.0, 3: 1.0}, {7: 1.0}]
    ranks = ranks_from_scores(scores, [list(judged) for judged in relevant])
    positions = [positions_in_list(r) for r in ranks]
    assert [p.tolist() for p in positions] == [[2.0], [1.0, 4.0], [7.0]]
    got = visdoc_scores(positions, [list(judged.values()) for judged in relevant])
    ndcg = [
        (1 / math.log2(3)) / 1.0,
        (2 / math.log2(2) + 1 / math.log2(5)) / (2 / math.log2(2) + 1 / math.log2(3)),
        0.0,
    ]
    assert got == pytest.approx(
        {
            "ndcg_linear@5": sum(ndcg) / 3,
            "recall@1": (0 + 0.5 + 0) / 3,
            "recall@5": (1 + 1 + 0) / 3,
            "recall@10": 1.0,
            "hit@1": 1 / 3,
            "mrr": (1 / 2 + 1 + 1 / 7) / 3,
        }
    )


def test_both_reports_each_scoring_as_its_own_run_does(multi_encoder, pages_dir, tmp_path):
    def visdoc(scoring: str) -> dict:
        config = EvalConfig(visdoc=[str(pages_dir)], visdoc_scoring=scoring, progress=False)  # type: ignore[arg-type]
        return run_eval(multi_encoder, config)

    both, single, multi = visdoc("both"), visdoc("single_vector"), visdoc("multi_vector")
    row = both["tasks"]["visdoc"][0]
    assert row["scoring"] == ["single_vector", "multi_vector"]
    assert row["scores_by_scoring"] == {
        "single_vector": single["tasks"]["visdoc"][0]["scores"],
        "multi_vector": multi["tasks"]["visdoc"][0]["scores"],
    }
    assert set(row["scores"]) == {"ndcg_linear@5", "recall@1", "recall@5", "recall@10", "hit@1", "mrr"}
    # Side by side: one markdown row per scoring, one plot with a bar per scoring for each metric.
    table = to_markdown(both)
    assert "| dataset | scoring | queries | pages | ndcg_linear@5 |" in table
    assert f"| visdoc | single_vector | 4 | 12 | {100 * row['scores']['ndcg_linear@5']:.1f} |" in table
    assert "| visdoc | multi_vector | 4 | 12 |" in table
    labels = list(task_rows(both)["visdoc visdoc"])
    assert labels[:2] == ["ndcg_linear@5 (single_vector)", "ndcg_linear@5 (multi_vector)"] and len(labels) == 12
    assert list(task_rows(single)["visdoc visdoc"]) == list(row["scores"])


def test_multi_vector_scoring_of_a_single_vector_model_is_an_error_naming_it(tiny_dir, pages_dir):
    encoder = UnimeEncoder(tiny_dir)
    for scoring in ("multi_vector", "both"):
        config = EvalConfig(visdoc=[str(pages_dir)], visdoc_scoring=scoring, progress=False)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=rf"visdoc_scoring: .*the model {tiny_dir} has no multi-vector head"):
            run_eval(encoder, config)
    with pytest.raises(ConfigError, match=str(tiny_dir)):
        run_visdoc(encoder, pages_dir, scoring="multi_vector", progress=False)


def test_unime_eval_run_visdoc_scoring_both_end_to_end(multi_dir, pages_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["eval", "run", "--visdoc", str(pages_dir), "--model", str(multi_dir), "--visdoc-scoring", "both"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["tasks"]["visdoc"][0]
    assert results["config"]["visdoc_scoring"] == "both" and set(row["scores_by_scoring"]) == {
        "single_vector",
        "multi_vector",
    }
    markdown = (out / "results.md").read_text()
    assert "| visdoc | single_vector |" in markdown and "| visdoc | multi_vector |" in markdown
    assert (out / "plots" / "visdoc_visdoc.png").stat().st_size > 0
    assert "multi_vector" in capsys.readouterr().out
