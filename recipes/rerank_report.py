"""SFT versus contrastive reranker training, and the paper's weight/direction swaps: the table in the README.

Trains the tiny Qwen2-VL reranker of the embedded default once per variant and seed, with the same budget
(`recipes/configs/reranker_sft.yaml`'s steps, batch and negatives), each from the same stage-1 model (trained
first with `recipes/configs/stage1_text_distill.yaml` on the same paraphrase corpus, or given with `--start`),
and prints the held-out nDCG@10 and MRR of reranking shuffled candidate lists (mean and standard deviation over
seeds). The variants follow "SFT or Contrastive Learning? Towards Better Multimodal LLM Reranking": SFT, CL, and
the unified loss with the weight W and the direction D taken from different sides (W_SFT + D_CL, W_CL + D_SFT,
W = 1 + D_SFT).

    OMP_NUM_THREADS=1 .venv/bin/python recipes/rerank_report.py [--seeds 0 1 2] [--out runs/rerank_report]

`--train-pairs` and `--held-out-pairs` size the paraphrase corpus (the README's table: 400 and 100); the test suite
runs a reduced report with fewer pairs and steps (tests/rerank/test_rerank_report.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent

# Every variant scores with the raw logits (temperature 1), as the paper does.
VARIANTS: dict[str, list[str]] = {
    "SFT (W_SFT + D_SFT)": ["loss.name=rerank_sft"],
    "CL (W_CL + D_CL)": ["loss.name=rerank_contrastive", "loss.temperature=1.0"],
    "W_SFT + D_CL": [
        "loss.name=rerank_unified",
        "loss.rerank_weight=sft",
        "loss.rerank_direction=cl",
        "loss.temperature=1.0",
    ],
    "W_CL + D_SFT": [
        "loss.name=rerank_unified",
        "loss.rerank_weight=cl",
        "loss.rerank_direction=sft",
        "loss.temperature=1.0",
    ],
    "W = 1 + D_SFT": ["loss.name=rerank_unified", "loss.rerank_weight=one", "loss.rerank_direction=sft"],
}
METRICS = ("ndcg@10", "mrr", "recall@1")
"""The table's metric columns, in order."""


class RerankReport(NamedTuple):
    """What the report measured and the table it prints (a NamedTuple: recipes load as files, outside any package,
    where dataclasses cannot resolve postponed annotations)."""

    start: Path
    """The model every variant starts from."""
    held_out: int
    """Held-out queries, each ranking its positive among shuffled candidates."""
    untrained: dict[str, float]
    """The start model's reranking metrics, with `random_mrr` (a random order's MRR), before any training."""
    results: dict[str, dict[str, list[float]]]
    """Variant -> metric -> one value per seed."""
    table: list[str]
    """The table's markdown lines: a header, a separator and one row per variant."""


def main(argv: list[str] | None = None) -> RerankReport:
    import importlib.util

    import unime
    from unime.data.dataset import load_examples
    from unime.data_synth.text_pairs import write_text_pairs
    from unime.train.config import load_train_config
    from unime.train.evaluation import reranking_metrics
    from unime.train.model import load_for_training

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="runs/rerank_report")
    parser.add_argument("--start", help="the model every variant starts from (default: train stage 1 first)")
    parser.add_argument("--train-pairs", type=int, default=400, help="training paraphrase pairs (stage 1, rerankers)")
    parser.add_argument("--held-out-pairs", type=int, default=100, help="held-out paraphrase pairs (the metrics)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. optim.max_steps=100")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = write_text_pairs(out / "data" / "text", train=args.train_pairs, held_out=args.held_out_pairs)
    held_out, _ = load_examples([data["held_out"]])

    def recipe(name: str):
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    data_overrides = [f"data.train_files=[{data['train']}]", f"data.eval_files=[{data['held_out']}]"]
    start = args.start or _stage1_model(recipe("train_embedder"), out, data_overrides)
    train_reranker = recipe("train_reranker")

    results: dict[str, dict[str, list[float]]] = {}
    config = HERE / "configs" / "reranker_sft.yaml"
    start_settings = load_train_config(config, [f"model.name_or_path={start}"]).model
    untrained = reranking_metrics(load_for_training(start_settings), held_out)
    for number, name in enumerate(args.variants):
        for seed in args.seeds:
            run_dir = out / f"variant{number}-seed{seed}"
            final = train_reranker(
                [
                    "--config",
                    str(config),
                    f"output_dir={run_dir}",
                    f"seed={seed}",
                    f"model.name_or_path={start}",
                    *data_overrides,
                    "log_with=[]",
                    *VARIANTS[name],
                    *args.overrides,
                ]
            )
            metrics = reranking_metrics(unime.load(final), held_out)
            for key, value in metrics.items():
                results.setdefault(name, {}).setdefault(key, []).append(value)

    print(f"\nheld-out reranking of shuffled candidate lists ({len(held_out)} queries), seeds {args.seeds}")
    print(f"every variant starts from {start}")
    print(
        f"before training: nDCG@10 {untrained['ndcg@10']:.3f}, MRR {untrained['mrr']:.3f} "
        f"(random order: MRR {untrained['random_mrr']:.3f})\n"
    )
    table = table_lines(results)
    print("\n".join(table))
    return RerankReport(Path(start), len(held_out), untrained, results, table)


def table_lines(results: dict[str, dict[str, list[float]]]) -> list[str]:
    """The markdown table: per variant, each metric's mean ± standard deviation over seeds, then MRR per seed."""
    lines = ["| variant | nDCG@10 | MRR | recall@1 | MRR per seed |", "|---|---|---|---|---|"]
    for name, metrics in results.items():
        cells = [_mean_spread(metrics[key]) for key in METRICS]
        per_seed = ", ".join(f"{value:.2f}" for value in metrics["mrr"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
    return lines


def _stage1_model(train_embedder, out: Path, data_overrides: list[str]) -> Path:
    """Stage 1 on the same paraphrase corpus (reused when its final model is already there)."""
    final = out / "stage1" / "final"
    if (final / "unime_config.json").is_file():
        return final
    config = HERE / "configs" / "stage1_text_distill.yaml"
    overrides = [f"output_dir={out / 'stage1'}", f"distill.cache_dir={out / 'teacher_cache'}", "log_with=[]"]
    return train_embedder(["--config", str(config), *data_overrides, *overrides])


def _mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


if __name__ == "__main__":
    main(sys.argv[1:])
