"""Train an embedder through unime's one training loop; the stage is chosen by the config.

Stage 1 of UniME (textual discriminative knowledge distillation from a text embedder into the language
model) and stage 2 (hard-negative enhanced instruction tuning) on the embedded default; make the data first
with `unime synth text runs/data/text` and `unime synth shapes runs/data/shapes`:

    python recipes/train_embedder.py --config recipes/configs/stage1_text_distill.yaml
    python recipes/train_embedder.py --config recipes/configs/stage2_hardneg_instruct.yaml \
        model.name_or_path=runs/stage1/final

Any config value can be overridden with dotted keys (values are YAML) or flags (`--optim.max-steps 500`;
`--help` lists them all), as every unime command's settings (`unime.settings`):

    python recipes/train_embedder.py --config recipes/configs/stage2_hardneg_instruct.yaml \
        optim.max_steps=500 optim.gradcache_chunk_size=8 model.name_or_path=Qwen/Qwen2-VL-2B-Instruct \
        model.backbone=auto

On GPUs, the same script under accelerate (the accelerate configs are in recipes/accelerate/):

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/train_embedder.py --config ...
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/train_embedder.py --config ...
    accelerate launch --config_file recipes/accelerate/zero2.yaml recipes/train_embedder.py --config ... \
        optim.gradcache_chunk_size=null
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/train_embedder.py --config ... \
        optim.gradcache_chunk_size=null

or `torchrun --nproc_per_node N recipes/train_embedder.py --config ...` (DDP). GradCache needs DDP or a single
process: DeepSpeed ZeRO-2/3 refuse it (one backward per chunk breaks their gradient partitioning).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    from unime.settings import parse_settings
    from unime.train.config import TrainConfig
    from unime.train.data import load_recipe_data
    from unime.train.evaluation import retrieval_recall, teacher_agreement
    from unime.train.loop import train
    from unime.train.model import load_for_training

    config = parse_settings(
        TrainConfig,
        argv if argv is not None else sys.argv[1:],
        prog="train_embedder.py",
        description=__doc__.splitlines()[0],
    )
    embedder = load_for_training(config.model)
    examples, held_out = load_recipe_data(config.data)
    eval_hook = None
    if config.data.eval_files:
        teacher = held_out_teacher(config, held_out) if config.loss.name == "text_distill_kl" else None
        # A late-interaction run trains the multi-vector head: score the held-out set the way it is trained (MaxSim).
        multi_vector = config.loss.name == "late_interaction"

        def eval_hook(model, step):
            metrics = retrieval_recall(model, held_out, multi_vector=multi_vector)
            if teacher is not None:
                metrics["teacher_spearman"] = teacher_agreement(model, held_out, teacher)
            return metrics

    return train(config, embedder, examples, eval_hook=eval_hook)


def held_out_teacher(config, held_out):
    """The teacher cache, filled with the held-out texts too (by the main process first)."""
    from accelerate import PartialState

    from unime.data.collator import distill_text
    from unime.train.teacher import distill_teacher_cache

    cache = distill_teacher_cache(config.distill)
    with PartialState().main_process_first():
        cache.ensure([distill_text(e, side) for e in held_out for side in (e.query, e.positive)])
    return cache


if __name__ == "__main__":
    main(sys.argv[1:])
