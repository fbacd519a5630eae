"""The quickstart's three-heads stage: one checkpoint that embeds, late-interacts and reranks, used alone.

Training is the recipe's (`recipes/train_three_heads.py`: `model.kind: multi_task`, one weighted objective per head,
through the one loop), every objective pointed at the rows `three_heads.data` names: the paraphrase pairs with mined
negatives (default) or the stage-2 rows (drawn scenes with mined negatives). The evaluation loads the saved directory
once, as one `MultiTaskModel`, and asks it, for the held-out queries against every document of the held-out rows
(their positives and negatives, each once): dense recall (pooled vectors), multi-vector recall (MaxSim of token
matrices), then the yes/no head reordering each shortlist, fused with the retrieval score
(`MultiTaskModel.retrieve_and_rerank`). Each step is scored on the same queries and corpus, with what a random order
scores beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unime.atomic import write_json_atomic
from unime.data.dataset import load_examples
from unime.data.schema import TrainExample
from unime.eval.report import markdown_table
from unime.metrics import hit_at_k, ndcg_at_k
from unime.quickstart.config import QuickstartConfig, recipe_config_path
from unime.quickstart.stages import StageResult

TRAIN_LOG = "train_log.jsonl"
"""The loop's logged metrics (total loss and each objective's), one step per line."""
STEPS = ("dense", "multi_vector", "dense+rerank", "multi_vector+rerank")
"""What the evaluation scores, in the report's order: each retrieval, then each shortlist reranked (fused)."""
METRICS = ("recall@1", "recall@5", "mrr@k", "ndcg@5", "recall@k")
"""Each step's numbers; `k` is the shortlist size (`three_heads.top_k`): MRR counts ranks inside it only."""


def run_three_heads(
    config: QuickstartConfig, data: dict[str, str], stage1: str, mined: dict[str, str], out: Path
) -> StageResult:
    """Train the multi-task model (from `stage1` or a tiny model) on the rows `three_heads.data` names (`mined`: the
    mining stage's artefacts), then evaluate it alone on their held-out rows; the numbers go to
    `<out>/metrics.json`."""
    import unime

    settings = config.three_heads
    start = f"tiny:{config.backbone}" if settings.start == "tiny" else stage1
    if settings.data == "text_mined":
        train_rows, held_out = mined["text_rows"], data["text_held_out"]
    else:
        train_rows, held_out = mined["rows"], data["shapes_held_out"]
    final = train_three_heads(config, start, train_rows, out)
    rows, _ = load_examples([held_out])
    metrics = evaluate_three_heads(
        unime.load(final),
        rows,
        top_k=settings.top_k,
        fusion_weight=settings.fusion_weight,
        batch_size=config.eval.batch_size,
    )
    path = out / "metrics.json"
    write_json_atomic(path, metrics)
    artefacts = {"model": str(final), "train_log": str(out / TRAIN_LOG), "metrics": str(path)}
    return StageResult(artefacts=artefacts, metrics=metrics)


def train_three_heads(config: QuickstartConfig, start: str, rows: str, out: Path) -> Path:
    """The recipe's training, each objective on `rows`; the model goes to `<out>/final` (reused when finished; an
    interrupted run resumes from its latest checkpoint)."""
    from unime.train.config import load_train_config
    from unime.train.data import load_recipe_data
    from unime.train.loop import train
    from unime.train.model import load_for_training

    out.mkdir(parents=True, exist_ok=True)
    final = out / "final"
    if (final / "unime_config.json").is_file():
        return final
    settings = config.three_heads
    negatives = config.mining.negatives if settings.data == "mined" else config.mining.text_negatives
    overrides = [
        f"output_dir={json.dumps(str(out))}",
        "log_with=[]",
        f"seed={config.seed}",
        f"optim.max_steps={settings.max_steps}",
        f"model.name_or_path={json.dumps(start)}",
        f"model.seed={config.seed}",
        "eval_every=0",  # the stage's own evaluation comes after training, on the loaded directory
        # The pooled vector and the multi-vector head train as stage 2 does: every mined negative of a row, and
        # every candidate of the batch kept by UniME's loss (its 8 hardest collapse a tiny model's embeddings).
        f"objectives.dense.data.num_negatives={negatives}",
        "objectives.dense.loss.hard_negatives=127",
        f"objectives.multi_vector.data.num_negatives={negatives}",
        # The reranker as the reranker stage trains it: half mined, half random documents per query.
        f"objectives.rerank.data.num_negatives={config.reranker.mined_negatives}",
        f"objectives.rerank.data.random_negatives={config.reranker.random_negatives}",
    ]
    for name in ("dense", "multi_vector", "rerank"):
        overrides += [
            f"objectives.{name}.data.train_files=[{json.dumps(rows)}]",
            f"objectives.{name}.data.eval_files=[]",
        ]
    train_config = load_train_config(recipe_config_path(config, settings.config), [*overrides, *settings.overrides])
    model = load_for_training(train_config.model)
    examples = {
        name: load_recipe_data(objective.data)[0] for name, objective in train_config.objectives.active().items()
    }
    log_path = out / TRAIN_LOG

    def log_step(step: int, logs: dict[str, float]) -> None:
        with log_path.open("a") as handle:  # a resumed run logs its steps again: readers keep the last values
            handle.write(json.dumps({"step": step, **logs}) + "\n")

    return Path(train(train_config, model, examples, on_step=log_step))


def evaluate_three_heads(
    model, rows: Sequence[TrainExample], *, top_k: int, fusion_weight: float | None, batch_size: int = 32
) -> dict[str, Any]:
    """Each step of retrieve-then-rerank by one `MultiTaskModel` on `rows`: every query against one corpus, the
    rows' positives and negatives (each text once); a query's relevant document is its own positive.

    Returns `queries`, `corpus`, `top_k`, each of `STEPS`' `METRICS` (a positive the shortlist missed counts as
    not found), each shortlist ordered by p(yes) alone (`<recall>+yes/no alone`), `chance` (a random order), and
    `gains`: each step over the one before it (multi-vector over dense, each reranked shortlist over its
    retrieval).
    """
    queries = [row.query.to_dict() for row in rows]
    corpus: dict[str, int] = {}
    documents = []
    for side in (side for row in rows for side in (row.positive, *row.negatives)):
        key = json.dumps(side.to_dict(), sort_keys=True)
        if key not in corpus:
            corpus[key] = len(documents)
            documents.append(side.to_dict())
    relevant = [corpus[json.dumps(row.positive.to_dict(), sort_keys=True)] for row in rows]
    # The rows carry their own instructions: the model asks with the ones it trained on (one per side, as drawn).
    instructions = {row.query.instruction for row in rows}
    if len(instructions) > 1:
        raise ValueError(f"the held-out queries carry {len(instructions)} instructions; expected one")
    instruction = instructions.pop() or ""
    model.embedder.set_prompts(query_instruction=instruction, document_instruction="")
    if instruction:
        model.set_rerank_prompt(default_instruction=instruction)  # the yes/no head trained with the row's one

    results: dict[str, Any] = {"queries": len(rows), "corpus": len(documents), "top_k": top_k}
    for recall in ("dense", "multi_vector"):
        ranked = model.retrieve_and_rerank(
            queries,
            documents,
            recall=recall,
            top_k_candidates=top_k,
            fusion_weight=fusion_weight,
            batch_size=batch_size,
        )
        retrieval = [_rank(r.indices, r.retrieval_scores, target) for r, target in zip(ranked, relevant, strict=True)]
        reranked = [_rank(r.indices, r.scores, target) for r, target in zip(ranked, relevant, strict=True)]
        judged = [_rank(r.indices, r.rerank_scores, target) for r, target in zip(ranked, relevant, strict=True)]
        results[recall] = _scores(retrieval, top_k)
        results[f"{recall}+rerank"] = _scores(reranked, top_k)
        results[f"{recall}+yes/no alone"] = _scores(judged, top_k)  # what the head knows, without the fusion
    results["chance"] = _chance(len(documents), top_k)
    results["gains"] = {
        "multi_vector over dense": _difference(results["multi_vector"], results["dense"]),
        "dense+rerank over dense": _difference(results["dense+rerank"], results["dense"]),
        "multi_vector+rerank over multi_vector": _difference(results["multi_vector+rerank"], results["multi_vector"]),
    }
    return results


def _rank(indices: list[int], scores: list[float], target: int) -> float:
    """1-based rank of `target` in a shortlist by `scores` (ties count against it); inf when the shortlist missed
    it."""
    if target not in indices:
        return float("inf")
    own = scores[indices.index(target)]
    return float(sum(score >= own for score in scores))


def _scores(ranks: list[float], top_k: int) -> dict[str, float]:
    capped = np.minimum(np.asarray(ranks), top_k + 1)  # a miss ranks after the shortlist: no hit, no gain
    return {
        "recall@1": hit_at_k(capped, 1),
        "recall@5": hit_at_k(capped, 5),
        "mrr@k": float(np.mean(np.where(capped <= top_k, 1.0 / capped, 0.0))),
        "ndcg@5": ndcg_at_k(capped, 5),
        "recall@k": hit_at_k(capped, top_k),
    }


def _chance(documents: int, top_k: int) -> dict[str, float]:
    """What a random order of `documents` scores (one relevant document per query)."""
    ranks = np.arange(1, documents + 1, dtype=np.float64)  # each rank equally likely
    return {
        "recall@1": 1 / documents,
        "recall@5": min(5, documents) / documents,
        "mrr@k": float(np.sum(1.0 / ranks[:top_k]) / documents),
        "ndcg@5": float(np.sum(1.0 / np.log2(ranks[:5] + 1)) / documents),
        "recall@k": min(top_k, documents) / documents,
    }


def _difference(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in METRICS}


ROWS = {
    "dense": "dense (pooled vectors, cosine)",
    "multi_vector": "multi-vector (token vectors, MaxSim)",
    "dense+rerank": "dense, shortlist reranked by the yes/no head (fused)",
    "multi_vector+rerank": "multi-vector, shortlist reranked by the yes/no head (fused)",
    "multi_vector+yes/no alone": "multi-vector, shortlist ordered by p(yes) alone",
    "chance": "chance (random order)",
}
"""The report's rows, in order, with their titles."""
PLOT = "three_heads.png"
"""The stage's figure beside the report: each objective's training loss, and each step's held-out numbers."""


def three_heads_section(
    config: QuickstartConfig, record: dict[str, Any], train_log: list[dict[str, float]], out: Path
) -> list[str]:
    """The report's lines for the stage: what was trained, the table of every step against chance, each step's
    gain over the one before, and the figure (drawn into `out` when matplotlib is installed; `train_log`: the
    training's logged steps, as `unime.quickstart.report.read_train_log` reads them)."""
    settings, metrics = config.three_heads, record["metrics"]
    k = metrics["top_k"]
    fusion = (
        "by p(yes) alone"
        if settings.fusion_weight is None
        else f"by retrieval score + {settings.fusion_weight} x p(yes)"
    )
    rows_named = "paraphrase pairs" if settings.data == "text_mined" else "drawn scenes"
    columns = {key: key.replace("@k", f"@{k}") for key in METRICS}
    lines = [
        "",
        "## One checkpoint, three heads: retrieve, then rerank",
        "",
        f"One multi-task model (`{settings.config}`: a pooled vector, a multi-vector head and the yes/no reranker on "
        f"one base, their weights shared) trained {settings.max_steps} steps from `{settings.start}` on the "
        f"{rows_named} with mined negatives (`{settings.data}`), every objective at every step; then that one loaded "
        f"directory retrieves for {metrics['queries']} held-out queries among {metrics['corpus']} documents and its "
        f"yes/no head reorders each top {k}, {fusion}. Ranks inside the top {k} only: a positive the shortlist "
        "missed counts as not found.",
        "",
        *markdown_table(
            ["step", *columns.values()],
            [[title, *(f"{metrics[key][m]:.2f}" for m in METRICS)] for key, title in ROWS.items()],
        ),
        "",
        "Each step's gain over the one before it:",
        "",
        *markdown_table(
            ["gain", *columns.values()],
            [[name, *(f"{round(gain[m], 2) + 0.0:+.2f}" for m in METRICS)] for name, gain in metrics["gains"].items()],
        ),
        "",
        f"The stage took {record.get('seconds', '-')} s.",
    ]
    if _plot(metrics, train_log, out / PLOT):
        lines += ["", f"Training losses of the three objectives, and each step's held-out numbers:\n\n![]({PLOT})\n"]
    return lines


def _plot(metrics: dict[str, Any], steps: list[dict[str, float]], path: Path) -> bool:
    """Draw the figure; False when matplotlib (the `eval` extra) is missing."""
    try:
        from unime.eval.report import pyplot, save_figure

        plt = pyplot()
    except ImportError:
        return False
    figure, (losses, bars) = plt.subplots(1, 2, figsize=(10, 3.4))
    for key in sorted({key for step in steps for key in step if key.startswith("loss/")}):
        points = [(step["step"], step[key]) for step in steps if key in step]
        losses.plot(*zip(*points, strict=True), linewidth=1, label=key[5:])
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.legend(fontsize=7)
    width = 0.8 / len(ROWS)
    for position, key in enumerate(ROWS):
        values = [metrics[key][m] for m in METRICS]
        bars.bar([i + position * width for i in range(len(METRICS))], values, width=width, label=key)
    bars.set_xticks([i + width * (len(ROWS) - 1) / 2 for i in range(len(METRICS))], list(METRICS), fontsize=7)
    bars.set_ylim(0, 1)
    bars.legend(fontsize=6)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return True
