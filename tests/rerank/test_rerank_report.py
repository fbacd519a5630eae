"""The SFT-versus-contrastive report (recipes/rerank_report.py), reduced: its table's rows are measured, not fixed."""

from __future__ import annotations

import re

import pytest

from tests.train.recipes import recipe_main

SFT, CL = "SFT (W_SFT + D_SFT)", "CL (W_CL + D_CL)"


@pytest.mark.slow
def test_a_reduced_report_prints_measured_sft_and_cl_rows(stage1_run, tmp_path, capsys) -> None:
    """Both matched losses, one seed, 60 steps each from the session's stage-1 model. The report's corpus has the
    stage-1 corpus's seed and 400 training pairs, so its 32 held-out pairs are the first of the held-out pairs that
    stage 1 never saw. Measured: MRR 0.27 before training (a random order: 0.31), 0.50 after SFT, 0.49 after CL (100
    steps: 0.54 and 0.51; the report's own budget is 600)."""
    stage1, _ = stage1_run
    report = recipe_main("rerank_report")(
        [
            "--start",
            str(stage1),
            "--out",
            str(tmp_path / "report"),
            "--seeds",
            "0",
            "--variants",
            SFT,
            CL,
            "--train-pairs",
            "400",
            "--held-out-pairs",
            "32",
            "optim.max_steps=60",
            "optim.warmup_steps=5",
            "eval_every=0",
            "save_every=0",
            "data.eval_files=[]",  # the report evaluates each final model itself
        ]
    )
    assert report.held_out == 32 and list(report.results) == [SFT, CL]
    for name, metrics in report.results.items():
        for key in ("ndcg@10", "mrr", "recall@1"):
            assert len(metrics[key]) == 1 and 0.0 <= metrics[key][0] <= 1.0, (name, key, metrics)
        # Trained beats the start model, whose new yes/no rows rank at chance, and a random order.
        assert metrics["mrr"][0] >= report.untrained["mrr"] + 0.1, (name, metrics, report.untrained)
        assert metrics["mrr"][0] >= report.untrained["random_mrr"] + 0.1, (name, metrics, report.untrained)
    assert report.results[SFT]["mrr"] != report.results[CL]["mrr"]

    # The printed table carries the same numbers: a header, a separator and one row per variant.
    printed = capsys.readouterr().out
    assert "\n".join(report.table) in printed
    header, separator, *rows = report.table
    assert header.startswith("| variant | nDCG@10 | MRR | recall@1 |") and set(separator) <= set("|-")
    for row, (name, metrics) in zip(rows, report.results.items(), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == name
        means = [float(re.match(r"([\d.]+) ± ", cell).group(1)) for cell in cells[1:4]]
        assert means == pytest.approx([metrics[key][0] for key in ("ndcg@10", "mrr", "recall@1")], abs=5e-4)
