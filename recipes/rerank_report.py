"""SFT versus contrastive reranker training, and the paper's weight/direction swaps: the table in the README.

Trains the tiny Qwen2-VL reranker of the embedded default once per variant and seed, with the same budget
(`recipes/configs/reranker_sft.yaml`'s steps, batch and negatives), and prints the held-out nDCG@10 and MRR of
reranking shuffled candidate lists (mean and standard deviation over seeds). The variants follow "SFT or
Contrastive Learning? Towards Better Multimodal LLM Reranking": SFT, CL, and the unified loss with the weight
W and the direction D taken from different sides (W_SFT + D_CL, W_CL + D_SFT, W = 1 + D_SFT).

    OMP_NUM_THREADS=1 .venv/bin/python recipes/rerank_report.py [--seeds 0 1 2] [--out runs/rerank_report]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

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


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    import importlib.util

    import unime
    from unime.data.dataset import load_examples
    from unime.data_synth.text_pairs import write_text_pairs
    from unime.train.evaluation import reranking_metrics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="runs/rerank_report")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run, e.g. optim.max_steps=100")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = write_text_pairs(out / "data" / "text")
    held_out, _ = load_examples([data["held_out"]])

    spec = importlib.util.spec_from_file_location("train_reranker", HERE / "train_reranker.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)

    results: dict[str, dict[str, list[float]]] = {}
    untrained = reranking_metrics(unime.build_tiny("qwen2_vl", kind="reranker"), held_out)
    for number, name in enumerate(args.variants):
        for seed in args.seeds:
            run_dir = out / f"variant{number}-seed{seed}"
            final = recipe.main(
                [
                    "--config",
                    str(HERE / "configs" / "reranker_sft.yaml"),
                    f"output_dir={run_dir}",
                    f"seed={seed}",
                    f"model.seed={seed}",
                    f"data.train_files=[{data['train']}]",
                    f"data.eval_files=[{data['held_out']}]",
                    "log_with=[]",
                    *VARIANTS[name],
                    *args.overrides,
                ]
            )
            metrics = reranking_metrics(unime.load(final), held_out)
            for key, value in metrics.items():
                results.setdefault(name, {}).setdefault(key, []).append(value)

    print(f"\nheld-out reranking of shuffled candidate lists ({len(held_out)} queries), seeds {args.seeds}")
    print(
        f"untrained: nDCG@10 {untrained['ndcg@10']:.3f}, MRR {untrained['mrr']:.3f} (random order: MRR "
        f"{untrained['random_mrr']:.3f})\n"
    )
    print("| variant | nDCG@10 | MRR | recall@1 |")
    print("|---|---|---|---|")
    for name, metrics in results.items():
        cells = [_mean_spread(metrics[key]) for key in ("ndcg@10", "mrr", "recall@1")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


def _mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


if __name__ == "__main__":
    main(sys.argv[1:])
