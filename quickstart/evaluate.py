"""The quickstart's evaluation: every stage's model on held-out data, and stage 2 + reranker on the benchmark.

Each embedder gets the numbers its own stage should move (text-to-text recall for stage 1, image-to-text
recall and hard-negative accuracy on unseen scenes for stage 2) and the held-out synthetic benchmark (MMEB
layout, image-text retrieval, SugarCrepe) through the evaluation harness. The reranker reorders the stage-2
model's top K of the held-out paraphrase pairs and of the benchmark's retrieval datasets, and is scored on its
own held-out rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from unime.data.dataset import load_examples
from unime.quickstart.config import QuickstartConfig

EMBEDDER_ROWS = {"untrained": "before training", "stage1": "after stage 1", "stage2": "after stage 2"}
"""The embedders evaluated, in order, with the name the report gives each."""


@dataclass
class HeldOut:
    """The held-out files each metric reads."""

    text: Path
    """Paraphrase pairs (text-to-text recall)."""
    shapes: Path
    """Unseen drawn scenes with every one-attribute alteration (image-to-text recall, hard-negative accuracy)."""
    reranker: Path
    """The reranker's own held-out rows."""
    benchmark: Path
    """Root of the synthetic benchmark."""


def evaluate_embedder(model, source: Any, held_out: HeldOut, config: QuickstartConfig) -> dict[str, Any]:
    """The stage metrics and the benchmark results of one embedder (`source`: its directory, or the model)."""
    from unime.eval.encoders import UnimeEncoder
    from unime.eval.runner import run_eval
    from unime.train.evaluation import retrieval_recall

    text_rows, _ = load_examples([held_out.text])
    shape_rows, _ = load_examples([held_out.shapes])
    scenes = retrieval_recall(model, shape_rows, batch_size=config.eval.batch_size)
    metrics = {
        "text_to_text_recall@1": retrieval_recall(model, text_rows, batch_size=config.eval.batch_size)["recall@1"],
        "image_to_text_recall@1": scenes["recall@1"],
        "hard_negative_accuracy": scenes["hard_negative_accuracy"],
    }
    results = run_eval(UnimeEncoder(source), benchmark_config(held_out.benchmark, config))
    metrics["benchmark_mmeb_hit@1"] = results["tasks"]["mmeb"]["leaderboard"]["overall"]
    return {"metrics": metrics, "benchmark": results}


def evaluate_reranking(
    stage2, stage2_dir: Path, reranker_dir: Path, start: Path | None, held_out: HeldOut, config: QuickstartConfig
) -> dict:
    """Stage 2's top K reordered by the reranker: on the held-out paraphrase pairs (text-to-text recall@1, the
    task the reranker trains on) and on the benchmark; and the reranker on its own held-out rows, before
    training (`start`: the embedder it started from, None for a tiny random model) and after. `stage2` is the
    stage-2 model, loaded from `stage2_dir`."""
    import unime
    from unime.eval.encoders import UnimeEncoder
    from unime.eval.runner import run_eval
    from unime.train.evaluation import reranked_recall, reranking_metrics

    reranker = unime.load(reranker_dir)
    bench = benchmark_config(held_out.benchmark, config)
    bench.mmeb_datasets = list(config.eval.rerank_datasets)
    bench.retrieval, bench.sugarcrepe = [], None
    bench.rerank_datasets = list(config.eval.rerank_datasets)
    bench.rerank_top_k = config.eval.rerank_top_k
    bench.rerank_fusion_weight = config.eval.fusion_weight
    results = run_eval(UnimeEncoder(stage2_dir), bench, reranker=reranker)
    text_rows, _ = load_examples([held_out.text])
    text = reranked_recall(
        stage2,
        reranker,
        text_rows,
        top_k=config.eval.text_rerank_top_k,
        fusion_weight=config.eval.fusion_weight,
        batch_size=config.eval.batch_size,
    )
    rows, _ = load_examples([held_out.reranker])
    own = {"after training": reranking_metrics(reranker, rows, seed=config.seed)}
    if start is None:
        untrained = unime.build_tiny(config.backbone, seed=config.seed, kind="reranker")
    else:
        untrained = unime.load(start, kind="reranker")
    untrained.set_rerank_prompt(
        system_prompt=reranker.config.rerank.system_prompt,
        default_instruction=reranker.config.rerank.default_instruction,
    )
    own = {"before training": reranking_metrics(untrained, rows, seed=config.seed), **own}
    return {"rerank": results["tasks"]["rerank"], "text": text, "own_held_out": own, "benchmark": results}


def benchmark_config(root: Path, config: QuickstartConfig):
    from unime.eval.runner import EvalConfig

    return EvalConfig(
        mmeb_root=str(root),
        retrieval=[str(root / "retrieval" / "test.json")],
        sugarcrepe=str(root / "sugarcrepe"),
        batch_size=config.eval.batch_size,
        cache_dir=None,
        progress=False,
    )


def evaluate_all(paths: dict[str, Path], held_out: HeldOut, config: QuickstartConfig, out_dir: Path) -> dict[str, Any]:
    """Every embedder in `EMBEDDER_ROWS`, then the reranking; each run's results also go to `out_dir/<name>/`."""
    import unime
    from unime.eval.runner import write_outputs

    evaluated: dict[str, Any] = {}
    models: dict[str, Any] = {}
    steps = [*EMBEDDER_ROWS, "reranker"]
    for name in tqdm(steps, desc="stage eval"):
        if name == "reranker":
            start = None if config.reranker.start == "tiny" else paths[config.reranker.start]
            result = evaluate_reranking(models["stage2"], paths["stage2"], paths["reranker"], start, held_out, config)
        elif name == "untrained":
            model = unime.build_tiny(config.backbone, seed=config.seed)
            result = evaluate_embedder(model, model, held_out, config)
        else:
            models[name] = unime.load(paths[name])
            result = evaluate_embedder(models[name], paths[name], held_out, config)
        write_outputs(result.pop("benchmark"), out_dir / name, plots=False)
        evaluated[name] = result
    return evaluated


def evaluate_visdoc(models: dict[str, Path], folder: Path, config: QuickstartConfig) -> dict[str, Any]:
    """The multi-vector model scored by MaxSim and the single-vector model by cosine (`models`: those two names ->
    directory) on the held-out drawn pages (`folder`: their BEIR layout): each query ranks the whole held-out
    corpus, every held-out page and hard negative (a page scored equal to the relevant one ranks above it).
    Returns nDCG@5, recall@1 and the rest of `unime.eval.visdoc`'s numbers per model, and what a random order
    scores."""
    import unime
    from unime.data_synth.pages import QUERY_INSTRUCTION
    from unime.eval.encoders import UnimeEncoder
    from unime.eval.visdoc import run_visdoc

    results: dict[str, Any] = {}
    for name in ("multi_vector", "single_vector"):
        model = unime.load(models[name])
        # The BEIR layout carries no instruction: queries are asked with the one their training rows carry.
        model.config.prompts.query_instruction = QUERY_INSTRUCTION
        encoder = UnimeEncoder(model)
        results[name] = run_visdoc(encoder, folder, scoring=name, batch_size=config.eval.batch_size, progress=False)[0]
    pages = results["multi_vector"]["pages"]
    return {
        "pages": pages,
        "queries": results["multi_vector"]["queries"],
        **{name: result["scores"] for name, result in results.items()},
        "chance": chance_scores(pages),
    }


def chance_scores(pages: int) -> dict[str, float]:
    """Expected nDCG@5 and recall@1 of a random order of `pages` pages, one of them relevant."""
    ndcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(5, pages) + 1)) / pages
    return {"ndcg_linear@5": ndcg, "recall@1": 1 / pages}
