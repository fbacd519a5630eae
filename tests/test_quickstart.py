"""`unime quickstart` end to end at the reduced size: every stage runs, each one improves its own held-out metric,
the served models answer like the local ones, the multi-vector stage scores its two models, one three-heads checkpoint
retrieves then reranks on its own, the report is written, and a second run resumes instead of starting again. Plus
the stage runner's resume rules, the config's overrides and the three-heads evaluation's arithmetic, on their own
(fast).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import unime
from unime.data.dataset import load_examples
from unime.data.schema import TrainExample
from unime.errors import ConfigError
from unime.inputs import Input
from unime.multi_task import MultiTaskModel
from unime.quickstart import load_quickstart_config, run_quickstart
from unime.quickstart.report import MULTI_VECTOR_COLUMNS
from unime.quickstart.stages import StageResult, StageRunner
from unime.quickstart.three_heads import METRICS, PLOT, STEPS, evaluate_three_heads
from unime.retrieve_rerank import RankedCandidates


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The ci-size quickstart, run in two goes: up to mining, then (resumed) to the end."""
    out = tmp_path_factory.mktemp("quickstart")
    config = load_quickstart_config("ci", [f"out={json.dumps(str(out))}"])
    first = run_quickstart(config, stop_after="mining")
    stage1_model = Path(first["stage1"]["artefacts"]["model"]) / "model.safetensors"
    stamp = stage1_model.stat().st_mtime_ns
    records = run_quickstart(config)
    return {"out": out, "records": records, "stage1_weights": stage1_model, "stage1_stamp": stamp, "config": config}


@pytest.mark.slow
def test_second_run_resumes_and_skips_finished_stages(quickstart) -> None:
    out, records = quickstart["out"], quickstart["records"]
    assert quickstart["stage1_weights"].stat().st_mtime_ns == quickstart["stage1_stamp"], "stage 1 was trained again"
    log = [json.loads(line) for line in (out / "stage1" / "train_log.jsonl").read_text().splitlines()]
    trained_steps = [entry["step"] for entry in log if "loss" in entry]  # evaluation lines carry no loss
    assert trained_steps == list(range(1, quickstart["config"].stage1.max_steps + 1))
    for name in ("data", "stage1", "mining", "stage2", "reranker", "eval", "serve", "multi_vector", "three_heads"):
        assert (out / "stages" / f"{name}.json").is_file(), name
        assert name in records


@pytest.mark.slow
def test_each_stage_improves_its_own_held_out_metric(quickstart) -> None:
    evaluated = quickstart["records"]["eval"]["metrics"]
    before, stage1, stage2 = (evaluated[name]["metrics"] for name in ("untrained", "stage1", "stage2"))
    # Stage 1: text distillation raises text-to-text recall on held-out paraphrase pairs (chance 1/60).
    assert stage1["text_to_text_recall@1"] >= before["text_to_text_recall@1"] + 0.10, (before, stage1)
    # Stage 2: image-to-text recall and hard-negative accuracy on unseen scenes (chance 1/24 and 0.5). The
    # benchmark's MMEB average is not asserted: it moved 0.18 -> 0.19 only (two-shape scenes at another size).
    assert stage2["image_to_text_recall@1"] >= stage1["image_to_text_recall@1"] + 0.20, (stage1, stage2)
    assert stage2["hard_negative_accuracy"] >= stage1["hard_negative_accuracy"] + 0.10, (stage1, stage2)
    # The reranker (from the stage-1 model, on paraphrase pairs with mined negatives): its own held-out
    # reranking, from its start. Measured: MRR 0.33 -> 0.68 (random order 0.31).
    reranker = evaluated["reranker"]
    own = reranker["own_held_out"]
    assert own["after training"]["mrr"] >= own["before training"]["mrr"] + 0.15, own
    assert own["after training"]["mrr"] >= own["after training"]["random_mrr"] + 0.15, own
    # Stage 2 + reranker over stage 2 alone: stage 2's top 10 of the held-out paraphrase pairs, reranked (fused
    # with the embedding score). Measured: recall@1 0.05 -> 0.18 (the shortlist holds the positive for 0.42).
    text = reranker["text"]
    assert stage2["text_to_text_recall@1"] == pytest.approx(text["recall@1"])
    assert text["reranked_recall@1"] >= text["recall@1"] + 0.08, text


@pytest.mark.slow
def test_served_models_answer_like_local_ones(quickstart) -> None:
    serve = quickstart["records"]["serve"]["metrics"]
    assert serve["exit_code"] == 0
    assert serve["embedding_min_cosine_to_local"] >= 0.999
    assert serve["rerank_max_score_difference"] <= 1e-3 and serve["rerank_sorted"]


@pytest.mark.slow
def test_report_has_every_stage_and_its_plots(quickstart) -> None:
    out = quickstart["out"]
    report = (out / "report.md").read_text()
    for row in ("before training", "after stage 1", "after stage 2", "stage 2 + reranker", "## Per task"):
        assert row in report
    for plot in ("training_curves.png", "stage_metrics.png", "per_task.png"):
        assert (out / plot).stat().st_size > 1000, plot
        assert f"]({plot})" in report


@pytest.mark.slow
def test_multi_vector_stage_scores_both_models_on_held_out_pages(quickstart) -> None:
    """The stage's two models are what they claim (a head on one only), scored on the held-out drawn pages with
    the right corpus and chance, and the report shows those numbers, with the stage's image budget saved in both
    directories. Its held-out learning is measured at the default size (`MultiVectorSettings`, docs/getting-started.md),
    not here: this size's 20 steps come before the training loss falls (at the default size, seed 0: 4.0 at step
    10, 4.6 at step 20, 3.5 at step 30)."""
    settings, record = quickstart["config"].multi_vector, quickstart["records"]["multi_vector"]
    metrics = record["metrics"]
    multi, single = (unime.load(record["artefacts"][name]) for name in ("model", "single_vector_model"))
    assert multi.config.multi_vector is not None and single.config.multi_vector is None
    budget = settings.max_pixels or unime.build_tiny().processor.image_processor.size["longest_edge"]
    for model in (multi, single):
        assert model.processor.image_processor.size["longest_edge"] == budget
    assert metrics["queries"] == settings.held_out_pages
    assert metrics["pages"] == settings.held_out_pages * (1 + settings.negatives)  # every held-out page, once
    assert metrics["chance"]["recall@1"] == pytest.approx(1 / metrics["pages"])
    for name in ("multi_vector", "single_vector"):
        assert all(0 <= metrics[name][key] <= 1 for key in MULTI_VECTOR_COLUMNS), metrics[name]
    report = (quickstart["out"] / "report.md").read_text()
    row = " | ".join(f"{metrics['multi_vector'][key]:.2f}" for key in MULTI_VECTOR_COLUMNS)
    assert f"| multi-vector (late interaction, MaxSim) | {row} |" in report


@pytest.mark.slow
def test_three_heads_stage_retrieves_then_reranks_with_one_loaded_model(quickstart) -> None:
    """The stage's directory is one multi-task model with its multi-vector head; every step's numbers come from that
    model (evaluated again here on the held-out pairs, they are the record's), dense and multi-vector recall are far
    above chance, and the report shows the table, the gains and the figure. Measured at this size (15 steps, seed 0,
    29 s): recall@1 dense 0.87 and multi-vector 0.87 (chance 0.02); the yes/no head alone 0.13 on the top 10 (1 in 10
    by chance there), too weak to move the fused order, so its reranking is not asserted to gain."""
    settings, record = quickstart["config"].three_heads, quickstart["records"]["three_heads"]
    metrics = record["metrics"]
    model = unime.load(record["artefacts"]["model"])
    assert isinstance(model, MultiTaskModel) and model.multi_vector_head is not None
    rows, _ = load_examples([quickstart["records"]["data"]["artefacts"]["text_held_out"]])
    assert metrics["queries"] == len(rows) and metrics["corpus"] == len({row.positive.text for row in rows})
    again = evaluate_three_heads(model, rows, top_k=settings.top_k, fusion_weight=settings.fusion_weight)
    for step in (*STEPS, "multi_vector+yes/no alone"):
        assert again[step] == pytest.approx(metrics[step]), step
    chance = metrics["chance"]
    assert chance["recall@1"] == pytest.approx(1 / metrics["corpus"])
    for step in ("dense", "multi_vector"):
        assert metrics[step]["recall@1"] >= 10 * chance["recall@1"], metrics[step]
    assert metrics["multi_vector+yes/no alone"] != metrics["multi_vector"]  # the head's own order was read
    gain = metrics["gains"]["multi_vector+rerank over multi_vector"]
    assert gain == pytest.approx({m: metrics["multi_vector+rerank"][m] - metrics["multi_vector"][m] for m in METRICS})
    out = quickstart["out"]
    report = (out / "report.md").read_text()
    assert "## One checkpoint, three heads: retrieve, then rerank" in report
    assert f"| dense (pooled vectors, cosine) | {metrics['dense']['recall@1']:.2f} |" in report
    assert (out / PLOT).stat().st_size > 1000 and f"]({PLOT})" in report


class _ListedModel:
    """Stands in for a `MultiTaskModel`: fixed shortlists, to check how the evaluation reads them."""

    def __init__(self, shortlists: list[RankedCandidates]):
        self.shortlists = shortlists
        self.embedder = self
        self.prompts: dict[str, str] = {}

    def set_prompts(self, **changes: str) -> None:
        self.prompts.update(changes)

    def set_rerank_prompt(self, **changes: str) -> None:
        self.prompts.update({f"rerank_{key}": value for key, value in changes.items()})

    def retrieve_and_rerank(self, queries, documents, **kwargs) -> list[RankedCandidates]:
        assert len(queries) == 2 and len(documents) == 3  # two rows; a negative repeating a positive counted once
        return self.shortlists


def test_three_heads_evaluation_ranks_inside_the_shortlist_only() -> None:
    """Ranks come from the shortlist's scores (ties against the positive); a positive the shortlist missed scores
    nothing; the rows' instruction is the one the model asks with."""
    query = {"instruction": "find"}
    rows = [
        TrainExample(Input(text="q0", **query), Input(text="a"), negatives=(Input(text="b"),)),
        TrainExample(Input(text="q1", **query), Input(text="b"), negatives=(Input(text="c"),)),
    ]
    # Query 0: its positive (0) second by retrieval, first after reranking, tied with 2 by p(yes) alone.
    # Query 1: its positive (1) not in the shortlist.
    model = _ListedModel(
        [
            RankedCandidates([0, 2], [1.5, 1.4], retrieval_scores=[0.5, 0.9], rerank_scores=[0.7, 0.7]),
            RankedCandidates([2, 0], [1.0, 0.5], retrieval_scores=[0.8, 0.3], rerank_scores=[0.2, 0.1]),
        ]
    )
    metrics = evaluate_three_heads(model, rows, top_k=2, fusion_weight=1.0)
    assert model.prompts == {
        "query_instruction": "find",
        "document_instruction": "",
        "rerank_default_instruction": "find",
    }
    assert metrics["dense"]["recall@1"] == 0 and metrics["dense"]["mrr@k"] == pytest.approx(0.25)
    assert metrics["dense+rerank"]["recall@1"] == 0.5 and metrics["dense+rerank"]["mrr@k"] == pytest.approx(0.5)
    assert metrics["dense+yes/no alone"]["recall@1"] == 0 and metrics["dense+yes/no alone"]["recall@k"] == 0.5
    assert metrics["gains"]["dense+rerank over dense"]["recall@1"] == 0.5
    chance = metrics["chance"]
    assert chance["recall@1"] == pytest.approx(1 / 3) and chance["recall@k"] == pytest.approx(2 / 3)


def test_stage_runner_skips_finished_stages_and_reruns_changed_ones(tmp_path: Path) -> None:
    calls: list[str] = []

    def action(name: str, fail: bool = False):
        def run() -> StageResult:
            calls.append(name)
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "artefact").write_text(name)
            if fail:
                raise RuntimeError("interrupted")
            return StageResult(artefacts={"artefact": str(tmp_path / name / "artefact")})

        return run

    def run_all(settings_b: int, fail_b: bool = False) -> None:
        runner = StageRunner(tmp_path)
        runner.run("a", "A", {"x": 1}, tmp_path / "a", action("a"))
        runner.run("b", "B", {"x": settings_b}, tmp_path / "b", action("b", fail_b))
        runner.run("c", "C", {"x": 1}, tmp_path / "c", action("c"))

    with pytest.raises(RuntimeError):
        run_all(1, fail_b=True)  # cut short in b: a is finished, b and c are not
    assert calls == ["a", "b"]
    run_all(1)
    assert calls == ["a", "b", "b", "c"]
    run_all(1)  # nothing to do
    assert calls == ["a", "b", "b", "c"]
    (tmp_path / "b" / "leftover").write_text("from the old settings")
    run_all(2)  # b's settings changed: b and everything after it run again, in a cleared folder
    assert calls == ["a", "b", "b", "c", "b", "c"]
    assert not (tmp_path / "b" / "leftover").exists()
    os.remove(tmp_path / "c" / "artefact")  # a missing artefact means the stage is not finished
    run_all(2)
    assert calls[-1] == "c" and len(calls) == 7


def test_quickstart_config_sizes_and_overrides() -> None:
    default, ci = load_quickstart_config("default"), load_quickstart_config("ci")
    assert ci.stage1.max_steps < default.stage1.max_steps and ci.stage1.config == default.stage1.config
    assert ci.multi_vector.max_steps < default.multi_vector.max_steps and ci.multi_vector.enabled
    config = load_quickstart_config("ci", ["reranker.max_steps=7", "stage2.overrides=[optim.lr=1e-3]"])
    assert config.reranker.max_steps == 7 and config.stage2.overrides == ["optim.lr=1e-3"]
    assert config.stage2.config == "stage2_hardneg_instruct.yaml"  # a partial section keeps its other defaults
    with pytest.raises(ConfigError, match=r"unknown key\(s\) reranker.steps"):
        load_quickstart_config("ci", ["reranker.steps=7"])
    with pytest.raises(ConfigError, match="reranker.start: expected one of"):
        load_quickstart_config("ci", ["reranker.start=bert"])
