"""Train a yes/no multimodal reranker through unime's one training loop; SFT or contrastive by config.

Following "SFT or Contrastive Learning? Towards Better Multimodal LLM Reranking": each query is paired with
its positive and N negatives (mined ones from the row, plus random documents), the judge prompt asks "yes" or
"no", and the loss is per-pair cross-entropy (SFT), listwise InfoNCE on z_yes (CL), or the paper's unified
form with its weight and direction swapped. On the embedded default (`unime synth shapes runs/data/shapes`):

    python recipes/train_reranker.py --config recipes/configs/reranker_sft.yaml
    python recipes/train_reranker.py --config recipes/configs/reranker_contrastive.yaml
    python recipes/train_reranker.py --config recipes/configs/reranker_sft.yaml \
        loss.name=rerank_unified loss.rerank_weight=cl loss.rerank_direction=sft

A real run starts from a backbone checkpoint (or a trained embedder directory) and real data, e.g.

    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train_reranker.py \
        --config recipes/configs/reranker_sft.yaml model.name_or_path=Qwen/Qwen2-VL-2B-Instruct \
        model.backbone=auto data.train_files=[mmeb_train.jsonl] data.num_negatives=8 data.random_negatives=8

The model directory it writes (`<output_dir>/final`) loads with `unime.load`, as a sentence-transformers
`CrossEncoder`, and in vLLM as a scorer.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    from unime.settings import parse_settings
    from unime.train.config import TrainConfig
    from unime.train.data import load_recipe_data
    from unime.train.evaluation import reranking_metrics
    from unime.train.loop import train
    from unime.train.model import load_for_training

    config = parse_settings(
        TrainConfig,
        argv if argv is not None else sys.argv[1:],
        prog="train_reranker.py",
        description=__doc__.splitlines()[0],
    )
    config.model.kind = "reranker"
    reranker = load_for_training(config.model)
    examples, held_out = load_recipe_data(config.data)
    eval_hook = None
    if config.data.eval_files:

        def eval_hook(model, step):
            return reranking_metrics(model, held_out, seed=config.seed)

    return train(config, reranker, examples, eval_hook=eval_hook)


if __name__ == "__main__":
    main(sys.argv[1:])
