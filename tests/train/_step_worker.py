"""One training step through the loop's own pieces, for the cross-process equivalence test.

Run as `python _step_worker.py OUT B CHUNK LOSS` (one process, batch B) or under
`torchrun --nproc_per_node 2 _step_worker.py OUT B/2 CHUNK LOSS`: it writes the loss (averaged over
processes) and the parameter gradients (as DDP leaves them: averaged) to OUT from process 0.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def main(out: str, batch_size: int, chunk: str, loss: str) -> None:
    import random

    from accelerate import Accelerator

    import unime
    from unime.data.collator import EmbeddingCollator
    from unime.data.schema import TrainExample
    from unime.data_synth.scenes import describe, random_scene
    from unime.inputs import Input
    from unime.pooling import finish_embeddings
    from unime.train.checkpoint import TrainerState
    from unime.train.config import TrainConfig
    from unime.train.loop import micro_batches, training_step
    from unime.train.objective import EmbeddingObjective
    from unime.train.trainable import make_trainable

    rng = random.Random(0)
    examples = []
    for i in range(8):
        scene = random_scene(rng)
        examples.append(
            TrainExample(
                Input(text=f"query {describe(scene)}"),
                Input(text=describe(scene)),
                negatives=(Input(text=describe(random_scene(rng))), Input(text=describe(random_scene(rng)))),
                origin=f"rows:{i}",
            )
        )
    config = TrainConfig()
    config.optim.batch_size = batch_size
    config.optim.gradcache_chunk_size = None if chunk == "none" else int(chunk)
    config.data.num_negatives = 2
    config.loss.name = loss
    config.loss.hard_negatives = 3
    config.loss.temperature = 0.05
    config.model.lora.dropout = 0.0  # dropout masks would differ between one process and two

    accelerator = Accelerator()
    embedder = unime.build_tiny("qwen2_vl", seed=0)
    make_trainable(embedder, config.model)
    with torch.no_grad():  # a non-identity adapter, so that LoRA A gets gradients too
        for name, parameter in embedder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    embedder.train()
    model = accelerator.prepare(embedder)
    collator = EmbeddingCollator(embedder, num_negatives=2, chunk_size=config.optim.gradcache_chunk_size)
    batch = next(micro_batches(examples, collator, config, accelerator, TrainerState()))
    objective = EmbeddingObjective(config.loss)

    def encode(features):
        return finish_embeddings(model(features), normalize=True)

    loss_value = training_step(model, encode, batch, objective, accelerator, config.optim.gradcache_chunk_size)
    mean_loss = accelerator.reduce(loss_value.detach().reshape(1), reduction="mean")
    grads = {
        name: p.grad.detach().clone()
        for name, p in accelerator.unwrap_model(model).named_parameters()
        if p.requires_grad
    }
    if accelerator.is_main_process:
        torch.save({"loss": mean_loss.item(), "grads": grads, "processes": accelerator.num_processes}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
