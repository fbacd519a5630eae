"""Train one checkpoint with three heads (pooled vector, multi-vector, yes/no reranker) through the one loop.

The model is `model.kind: multi_task`: one base whose weights every head shares. Each objective in `objectives`
(`dense`, `multi_vector`, `rerank`) has a weight, its own data and its own loss; every optimizer step draws one
micro-batch of each objective with a weight above 0 and backpropagates the weighted sum. On the embedded default
(make the data first: `unime synth shapes runs/data/shapes`, `unime synth pages runs/data/pages`,
`unime synth text runs/data/text`):

    python recipes/train_three_heads.py --config recipes/configs/three_heads.yaml

A real backbone (recipes/configs/real/qwen2_vl_2b_three_heads.yaml) on GPUs:

    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train_three_heads.py \
        --config recipes/configs/real/qwen2_vl_2b_three_heads.yaml

The directory it writes (`<output_dir>/final`) loads with `unime.load` as one `MultiTaskModel`
(`encode(..., output="dense" | "multi_vector")`, `predict`, `rank`); `SentenceTransformer(dir)` and
`MultiVectorEncoder(dir)` read its root, `CrossEncoder(dir + "/reranker")` its reranker (`unime.multi_task`).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    from unime.settings import parse_settings
    from unime.train.config import TrainConfig
    from unime.train.data import load_recipe_data
    from unime.train.evaluation import reranking_metrics, retrieval_recall
    from unime.train.loop import train
    from unime.train.model import load_for_training

    config = parse_settings(
        TrainConfig,
        argv if argv is not None else sys.argv[1:],
        prog="train_three_heads.py",
        description=__doc__.splitlines()[0],
    )
    config.model.kind = "multi_task"
    model = load_for_training(config.model)
    examples, held_out = {}, {}
    for name, objective in config.objectives.active().items():
        print(f"objective {name} (weight {objective.weight}):")
        examples[name], held_out[name] = load_recipe_data(objective.data)

    def eval_hook(model, step):
        metrics = {}
        for name, rows in held_out.items():
            if not rows:
                continue
            if name == "rerank":
                scores = reranking_metrics(model.reranker, rows, seed=config.seed)
            else:
                scores = retrieval_recall(model.embedder, rows, multi_vector=name == "multi_vector")
            metrics.update({f"{name}/{key}": value for key, value in scores.items()})
        return metrics

    return train(config, model, examples, eval_hook=eval_hook if any(held_out.values()) else None)


if __name__ == "__main__":
    main(sys.argv[1:])
