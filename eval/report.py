"""Results for people: a markdown table per task, bar plots per task, and runs compared side by side.

Numbers are stored as fractions in `results.json` and shown as percentages (one decimal), as the MMEB
leaderboard and the retrieval papers print them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LEADERBOARD_COLUMNS = ("classification", "vqa", "retrieval", "grounding", "IND", "OOD", "overall")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def task_rows(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Every task's headline numbers: `{group: {label: value}}`, the data of the plots."""
    tasks = results["tasks"]
    groups: dict[str, dict[str, float]] = {}
    if "mmeb" in tasks:
        groups["MMEB hit@1 per dataset"] = {row["dataset"]: row["scores"]["hit@1"] for row in tasks["mmeb"]["datasets"]}
        groups["MMEB leaderboard"] = {
            key: value for key, value in tasks["mmeb"]["leaderboard"].items() if value is not None
        }
    for result in tasks.get("retrieval", []):
        groups[f"retrieval {result['dataset']}"] = dict(result["scores"])
    if "compositional" in tasks:
        groups[f"compositional {tasks['compositional']['dataset']}"] = dict(tasks["compositional"]["scores"])
    for result in tasks.get("visdoc", []):
        by_scoring = visdoc_scorings(result)
        if len(by_scoring) == 1:
            groups[f"visdoc {result['dataset']}"] = dict(next(iter(by_scoring.values())))
        else:
            # Metric by metric, one bar per scoring beside the other, so the two sit side by side in the plot.
            metrics = list(dict.fromkeys(metric for scores in by_scoring.values() for metric in scores))
            groups[f"visdoc {result['dataset']}"] = {
                f"{metric} ({scoring})": scores[metric]
                for metric in metrics
                for scoring, scores in by_scoring.items()
                if metric in scores
            }
    for result in tasks.get("rerank", []):
        groups[f"rerank {result['dataset']}"] = dict(result["scores"])
    return groups


def visdoc_scorings(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A visdoc result's numbers per scoring (`single_vector`, `multi_vector`); a results file written before
    visdoc had scorings holds single-vector numbers only."""
    return result.get("scores_by_scoring") or {"single_vector": result["scores"]}


SCORING_COLORS = {"single_vector": "tab:blue", "multi_vector": "tab:orange"}
"""Bar colours of the visdoc scorings; any other bar is blue."""


def _bar_color(label: str) -> str:
    scoring = label.rpartition(" (")[2].rstrip(")") if label.endswith(")") else ""
    return SCORING_COLORS.get(scoring, "tab:blue")


def to_markdown(results: dict[str, Any]) -> str:
    encoder = results["encoder"]
    lines = [
        f"# Evaluation of {encoder.get('model', encoder.get('url', '?'))} ({encoder['backend']})",
        "",
        f"unime {results['unime_version']}, {results['created']}, {results['wall_seconds']:.1f} s; items listed "
        f"{results['embedding']['listed']}, distinct {results['embedding']['distinct']}, encoded "
        f"{results['embedding']['encoded']} (the rest came from the cache). Scores in %.",
        "",
    ]
    tasks = results["tasks"]
    if "mmeb" in tasks:
        mmeb = tasks["mmeb"]
        lines += ["## MMEB", "", "Precision@1 (hit@1), averaged as the MMEB leaderboard reports it:", ""]
        lines += markdown_table(LEADERBOARD_COLUMNS, [[_pct(mmeb["leaderboard"].get(c)) for c in LEADERBOARD_COLUMNS]])
        lines += ["", "Per dataset:", ""]
        header = ("dataset", "meta-task", "split", "queries", "hit@1", "hit@5", "hit@10", "nDCG@5", "MRR", "skipped")
        rows = [
            [
                row["dataset"],
                row["category"],
                row["split"],
                str(row["queries"]),
                *(_pct(row["scores"][m]) for m in ("hit@1", "hit@5", "hit@10", "ndcg@5", "mrr")),
                str(row["skipped"]["count"]),
            ]
            for row in mmeb["datasets"]
        ]
        lines += markdown_table(header, rows) + [""]
    if tasks.get("retrieval"):
        lines += ["## Image-text retrieval", ""]
        keys = list(tasks["retrieval"][0]["scores"])
        rows = [
            [r["dataset"], str(r["images"]), str(r["captions"]), *(_pct(r["scores"][k]) for k in keys)]
            for r in tasks["retrieval"]
        ]
        lines += markdown_table(("dataset", "images", "captions", *keys), rows) + [""]
    if "compositional" in tasks:
        result = tasks["compositional"]
        lines += ["## Compositional (SugarCrepe)", ""]
        lines += markdown_table(list(result["scores"]), [[_pct(v) for v in result["scores"].values()]]) + [""]
    if tasks.get("visdoc"):
        lines += ["## Visual-document retrieval", ""]
        keys = list(dict.fromkeys(k for r in tasks["visdoc"] for scores in visdoc_scorings(r).values() for k in scores))
        rows = [
            [r["dataset"], scoring, str(r["queries"]), str(r["pages"]), *(_pct(scores.get(k)) for k in keys)]
            for r in tasks["visdoc"]
            for scoring, scores in visdoc_scorings(r).items()
        ]
        lines += markdown_table(("dataset", "scoring", "queries", "pages", *keys), rows) + [""]
    if tasks.get("rerank"):
        lines += ["## Reranking", ""]
        keys = list(tasks["rerank"][0]["scores"])
        rows = [[r["dataset"], str(r["top_k"]), *(_pct(r["scores"][k]) for k in keys)] for r in tasks["rerank"]]
        lines += markdown_table(("dataset", "top K", *keys), rows) + [""]
    skipped = _skipped(results)
    if skipped:
        lines += ["## Skipped rows", ""]
        for where, count, reasons, examples in skipped:
            lines.append(f"- {where}: {count} ({reasons})")
            lines += [f"  - {example}" for example in examples]  # the first few, each as file:line
        lines.append("")
    return "\n".join(lines)


def _skipped(results: dict[str, Any]) -> list[tuple[str, int, str, list[str]]]:
    tasks = results["tasks"]
    entries = []
    for row in tasks.get("mmeb", {}).get("datasets", []):
        entries.append((f"MMEB {row['dataset']}", row["skipped"]))
    for key in ("retrieval", "visdoc", "rerank"):
        entries += [(f"{key} {r['dataset']}", r["skipped"]) for r in tasks.get(key, [])]
    if "compositional" in tasks:
        entries.append(("compositional", tasks["compositional"]["skipped"]))
    return [
        (
            where,
            skip["count"],
            ", ".join(f"{reason}: {n}" for reason, n in skip["reasons"].items()),
            list(skip.get("examples", [])),
        )
        for where, skip in entries
        if skip["count"]
    ]


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display needed)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text).strip("_")


def plot_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """One bar chart per task group (per-dataset hit@1, leaderboard, each retrieval set, ...)."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for group, values in task_rows(results).items():
        figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(values) + 2), 3.5))
        colors = [_bar_color(label) for label in values]
        axes.bar(range(len(values)), [100 * v for v in values.values()], color=colors)
        if len(set(colors)) > 1:  # visdoc with both scorings: say which colour is which
            shown = {scoring: color for scoring, color in SCORING_COLORS.items() if color in colors}
            handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in shown.values()]
            axes.legend(handles, list(shown), fontsize=8)
        axes.set_xticks(range(len(values)), list(values), rotation=45, ha="right", fontsize=8)
        axes.set_ylabel("%")
        axes.set_ylim(0, 100)
        axes.set_title(group)
        figure.tight_layout()
        path = out_dir / f"{_slug(group)}.png"
        save_figure(figure, path)
        plt.close(figure)
        paths[group] = path
    return paths


def plot_comparison(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: str | Path) -> Path:
    """Several runs side by side: one panel per task group, one bar per run for each number."""
    plt = pyplot()
    groups = [task_rows(run) for run in runs]
    names = list(dict.fromkeys(name for group in groups for name in group))
    figure, axes_list = plt.subplots(len(names), 1, figsize=(10, 3.2 * len(names)), squeeze=False)
    width = 0.8 / max(1, len(runs))
    for axes, name in zip(axes_list[:, 0], names, strict=True):
        keys = list(dict.fromkeys(key for group in groups for key in group.get(name, {})))
        for position, (group, label) in enumerate(zip(groups, labels, strict=True)):
            values = [100 * group.get(name, {}).get(key, float("nan")) for key in keys]
            axes.bar([i + position * width for i in range(len(keys))], values, width=width, label=label)
        axes.set_xticks(
            [i + width * (len(runs) - 1) / 2 for i in range(len(keys))], keys, rotation=45, ha="right", fontsize=8
        )
        axes.set_ylim(0, 100)
        axes.set_ylabel("%")
        axes.set_title(name)
        axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    save_figure(figure, path)
    plt.close(figure)
    return path


def save_figure(figure, path: Path) -> None:
    """Write a figure beside its target and rename it into place (a reader never sees half a PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
