"""The quickstart's report: `report.md` with the metric table of every stage, per-task tables, and PNG plots.

Plots beside it: `training_curves.png` (each training stage's loss and in-training evaluation, from the loop's
logged metrics), `stage_metrics.png` (the headline numbers per stage) and `per_task.png` (every benchmark task,
one bar per model, drawn by `unime.eval.report.plot_comparison`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unime.atomic import atomic_write
from unime.eval.report import markdown_table
from unime.quickstart.config import QuickstartConfig
from unime.quickstart.evaluate import EMBEDDER_ROWS
from unime.quickstart.three_heads import three_heads_section

HEADLINE = {
    "text_to_text_recall@1": "text-to-text recall@1 (held-out pairs)",
    "image_to_text_recall@1": "image-to-text recall@1 (unseen scenes)",
    "hard_negative_accuracy": "hard-negative accuracy",
    "benchmark_mmeb_hit@1": "benchmark MMEB hit@1 (all datasets)",
}
TRAINED = {"stage1": "stage 1", "stage2": "stage 2", "reranker": "reranker"}


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def read_train_log(path: str | Path) -> list[dict[str, float]]:
    """The loop's logged steps, one entry per step (lines of the same step merge; a resumed run's repeated steps
    keep their last values)."""
    steps: dict[int, dict[str, float]] = {}
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                steps.setdefault(int(entry["step"]), {}).update(entry)
    return [steps[step] for step in sorted(steps)]


def write_report(config: QuickstartConfig, records: dict[str, dict[str, Any]], out: Path, *, seconds: float) -> Path:
    """Write `<out>/report.md` and its plots; returns the report's path."""
    evaluated = records["eval"]["metrics"]
    runs = benchmark_runs(records)
    rerank = {entry["dataset"]: entry for entry in evaluated["reranker"]["rerank"]}
    datasets = list(rerank)
    lines = [
        "# unime quickstart report",
        "",
        f"Size `{config.size}`, seed {config.seed}, backbone `{config.backbone}` (a tiny model built in code). "
        "Held-out data only: paraphrase pairs and drawn scenes that no training row contains, and the "
        "synthetic benchmark (MMEB layout, image-text retrieval, SugarCrepe).",
        "",
        "## Every stage",
        "",
    ]
    header = ["model", *HEADLINE.values(), *(f"benchmark {d} recall@1" for d in datasets)]
    rows = []
    for name, title in EMBEDDER_ROWS.items():
        metrics = evaluated[name]["metrics"]
        bench = {row["dataset"]: row["scores"]["hit@1"] for row in runs[title]["tasks"]["mmeb"]["datasets"]}
        rows.append([title, *(_num(metrics[k]) for k in HEADLINE), *(_num(bench.get(d)) for d in datasets)])
    top_k = config.eval.rerank_top_k
    text = evaluated["reranker"]["text"]
    rows.append(
        [
            f"stage 2 + reranker (top {config.eval.text_rerank_top_k} / {top_k} reranked)",
            _num(text["reranked_recall@1"]),
            *("-" for _ in list(HEADLINE)[1:]),
        ]
        + [_num(rerank[d]["scores"]["after/recall@1"]) for d in datasets]
    )
    lines += markdown_table(header, rows)
    lines += [
        "",
        "Chance: text-to-text 1/"
        + str(config.data.text_held_out)
        + ", image-to-text 1/"
        + str(config.data.shapes_held_out)
        + ", hard-negative accuracy 0.5, benchmark retrieval 1/"
        + str(config.data.benchmark_candidates)
        + ".",
        "",
        "## Reranking",
        "",
        f"The stage-2 model's top {top_k} reordered by the reranker"
        + (
            f" (fused: embedding score + {config.eval.fusion_weight} x reranker score)"
            if config.eval.fusion_weight is not None
            else " (by reranker score)"
        )
        + f"; reranker trained on `{config.reranker.data}` rows from `{config.reranker.start}`.",
        "",
        f"Held-out paraphrase pairs (text-to-text, the reranker's own task), stage 2's top "
        f"{config.eval.text_rerank_top_k} reranked: recall@1 {_num(text['recall@1'])} -> "
        f"{_num(text['reranked_recall@1'])} (the shortlist holds the positive for "
        f"{_num(text[f'recall@{config.eval.text_rerank_top_k}'])} of the queries: the most reranking can reach).",
        "",
        "The benchmark's retrieval datasets (images against captions):",
        "",
    ]
    keys = ("mrr", "recall@1", "ndcg@10")
    lines += markdown_table(
        ["dataset", *(f"stage 2 {k}" for k in keys), *(f"+ reranker {k}" for k in keys)],
        [
            [
                d,
                *(_num(rerank[d]["scores"][f"before/{k}"]) for k in keys),
                *(_num(rerank[d]["scores"][f"after/{k}"]) for k in keys),
            ]
            for d in datasets
        ],
    )
    own = evaluated["reranker"]["own_held_out"]
    lines += [
        "",
        "The reranker on its own held-out rows (each query's positive among its negatives and 8 random documents):",
        "",
    ]
    lines += markdown_table(
        ["reranker", "MRR", "nDCG@10", "recall@1", "random-order MRR"],
        [[name, *(_num(m[k]) for k in ("mrr", "ndcg@10", "recall@1", "random_mrr"))] for name, m in own.items()],
    )
    lines += ["", "## Per task (benchmark, %)", ""]
    lines += _per_task_table(runs)
    lines += ["", "## Plots", "", *_plots(records, runs, out)]
    if "serve" in records:
        serve = records["serve"]["metrics"]
        lines += [
            "",
            "## Serving",
            "",
            f"`unime serve` ({serve['backend']} backend) started in {serve['startup_seconds']} s; `/v1/embeddings` "
            f"matched local encoding (min cosine {serve['embedding_min_cosine_to_local']:.6f}), `/v1/rerank` matched "
            f"local `predict` (max difference {serve['rerank_max_score_difference']:.2e}) and ranked "
            f"{serve['rerank_order']}; SIGTERM stopped it with exit code {serve['exit_code']}.",
        ]
    if "multi_vector" in records:
        lines += _multi_vector_section(config, records["multi_vector"]["metrics"])
    if "three_heads" in records:
        record = records["three_heads"]
        lines += three_heads_section(config, record, read_train_log(record["artefacts"]["train_log"]), out)
    lines += ["", "## Stages", ""]
    lines += markdown_table(
        ["stage", "artefact", "seconds"],
        [[name, f"`{next(iter(r['artefacts'].values()))}`", str(r.get("seconds", "-"))] for name, r in records.items()],
    )
    lines += ["", f"This run: {seconds:.0f} s (stages finished by an earlier run were skipped)."]
    path = out / "report.md"
    with atomic_write(path) as handle:
        handle.write("\n".join(lines) + "\n")
    return path


MULTI_VECTOR_COLUMNS = {
    "ndcg_linear@5": "nDCG@5 (whole held-out corpus)",
    "recall@1": "recall@1 (whole held-out corpus)",
}


def _multi_vector_section(config: QuickstartConfig, metrics: dict[str, Any]) -> list[str]:
    """The multi-vector model against the single-vector one on held-out drawn pages, with a random order."""
    settings = config.multi_vector
    rows = {
        "multi-vector (late interaction, MaxSim)": metrics["multi_vector"],
        "single-vector (cosine), same pages and start": metrics["single_vector"],
        "chance (random order)": metrics["chance"],
    }
    return [
        "",
        "## Multi-vector on drawn pages",
        "",
        f"A multi-vector model (`{settings.config}`: token vectors scored by MaxSim, ColPali-style) and a "
        f"single-vector model, each trained {settings.max_steps} steps from the same tiny start on "
        f"{settings.train_pages} drawn document pages (`unime synth pages`: one query about one fact per page, "
        f"{settings.negatives} hard-negative pages that differ only in that fact). Held out: "
        f"{metrics['queries']} queries, each ranking a corpus of {metrics['pages']} unseen pages (every held-out "
        "page and its hard negatives; a page scored equal to the relevant one ranks above it).",
        "",
        *markdown_table(
            ["model", *MULTI_VECTOR_COLUMNS.values()],
            [[name, *(_num(m[key]) for key in MULTI_VECTOR_COLUMNS)] for name, m in rows.items()],
        ),
    ]


def benchmark_runs(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each embedder's benchmark results (`results.json` of the evaluation harness), by its report title."""
    eval_dir = Path(records["eval"]["artefacts"]["metrics"]).parent
    return {title: json.loads((eval_dir / name / "results.json").read_text()) for name, title in EMBEDDER_ROWS.items()}


def _per_task_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    from unime.eval.report import task_rows

    groups = {title: task_rows(run) for title, run in runs.items()}
    titles = list(groups)
    first = groups[titles[0]]
    rows = []
    for group, values in first.items():
        for label in values:
            cells = [groups[t].get(group, {}).get(label) for t in titles]
            rows.append([group, label, *("-" if v is None else f"{100 * v:.1f}" for v in cells)])
    return markdown_table(["task", "metric", *titles], rows)


def _plots(records: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]], out: Path) -> list[str]:
    """Draw the plots (with matplotlib, the `eval` extra); returns the report's lines that show them."""
    try:
        from unime.eval.report import plot_comparison, pyplot, save_figure

        plt = pyplot()
    except ImportError:
        return ["(no plots: matplotlib is not installed; `pip install 'unime[eval]'`)"]
    lines = []
    logs = {title: read_train_log(records[name]["artefacts"]["train_log"]) for name, title in TRAINED.items()}
    figure, axes = plt.subplots(1, len(logs), figsize=(4.5 * len(logs), 3.4), squeeze=False)
    for ax, (title, steps) in zip(axes[0], logs.items(), strict=True):
        losses = [(s["step"], s["loss"]) for s in steps if "loss" in s]
        ax.plot(*zip(*losses, strict=True), color="tab:blue", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="tab:blue")
        evals = sorted({k for s in steps for k in s if k.startswith("eval/") and k != "eval/random_mrr"})
        if evals:
            twin = ax.twinx()
            for key in evals:
                points = [(s["step"], s[key]) for s in steps if key in s]
                twin.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key[5:])
            twin.set_ylim(0, 1)
            twin.set_ylabel("held-out metric")
            twin.legend(fontsize=7, loc="center right")
    figure.tight_layout()
    save_figure(figure, out / "training_curves.png")
    plt.close(figure)
    lines.append("Training curves (loss, and the held-out metrics the loop evaluated):\n\n![](training_curves.png)\n")

    evaluated = records["eval"]["metrics"]
    figure, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / len(EMBEDDER_ROWS)
    for position, (name, title) in enumerate(EMBEDDER_ROWS.items()):
        values = [evaluated[name]["metrics"][k] for k in HEADLINE]
        ax.bar([i + position * width for i in range(len(HEADLINE))], values, width=width, label=title)
    ax.set_xticks([i + width * (len(EMBEDDER_ROWS) - 1) / 2 for i in range(len(HEADLINE))], list(HEADLINE), fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, out / "stage_metrics.png")
    plt.close(figure)
    lines.append("Each stage's metrics:\n\n![](stage_metrics.png)\n")

    plot_comparison(list(runs.values()), list(runs), out / "per_task.png")
    lines.append("Per task on the benchmark:\n\n![](per_task.png)")
    return lines
