"""The one training loop (DESIGN.md, contract 6): every recipe trains through `train`.

It runs under plain Python, `torchrun` or `accelerate launch` (single process, DDP, DeepSpeed ZeRO-2/3):
the Accelerator picks the backend up from the environment.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from unime.data.collator import EmbeddingCollator, RerankCollator, TrainBatch
from unime.data.sampler import TrainBatchSampler
from unime.data.schema import TrainExample
from unime.errors import ConfigError
from unime.pooling import finish_embeddings
from unime.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from unime.train.config import TrainConfig
from unime.train.gradcache import encode_with_grad_cache, encode_without_cache
from unime.train.objective import EmbeddingObjective, RerankObjective
from unime.train.trainable import count_parameters, make_trainable

EvalHook = Callable[[Any, int], dict[str, float]]


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    precision = config.optim.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Full fine-tuning with a trainable vision tower leaves it unused on text-only batches, which DDP must allow.
    unused = not config.model.lora.enabled and not config.model.freeze_vision
    return Accelerator(
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=config.log_with or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=unused),
            *([InitProcessGroupKwargs(backend="gloo")] if deepspeed_ranks_on_cpu() else []),
        ],
    )


def deepspeed_ranks_on_cpu() -> bool:
    """Whether a launcher (torchrun) started this process as one DeepSpeed rank on a machine without GPUs.

    accelerate joins DeepSpeed ranks into one process group only on an accelerator's backend (nccl, ...): on CPUs
    it names none, and every rank then trains alone, as "1 process", on its own data. Naming gloo gives the ranks
    one group: ZeRO then shards across them. `ACCELERATE_USE_CPU` beside DeepSpeed is refused, because
    accelerate then drops DeepSpeed without a word and trains plain data parallel.
    """
    from accelerate.utils import parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return False
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        raise ConfigError(
            "ACCELERATE_USE_CPU (accelerate's --cpu) and DeepSpeed (ACCELERATE_USE_DEEPSPEED) are both set: accelerate "
            "would train without DeepSpeed. Unset ACCELERATE_USE_CPU; on a machine without GPUs DeepSpeed runs on "
            "the CPU (DS_ACCELERATOR=cpu) over gloo"
        )
    return os.environ.get("LOCAL_RANK") is not None and not torch.cuda.is_available()


def check_backend(accelerator, config: TrainConfig) -> None:
    """Fill DeepSpeed's batch settings, and refuse combinations that would train with wrong gradients."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    # accelerate resolves these "auto" values from a prepared DataLoader; the loop shards batches itself.
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = config.optim.batch_size
    plugin.deepspeed_config["train_batch_size"] = (
        config.optim.batch_size * accelerator.num_processes * config.optim.gradient_accumulation_steps
    )
    if plugin.deepspeed_config.get("gradient_clipping") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = config.optim.max_grad_norm or 0.0
    stage = plugin.zero_stage
    if config.optim.gradcache_chunk_size is not None and stage >= 2:
        raise ConfigError(
            f"GradCache (optim.gradcache_chunk_size={config.optim.gradcache_chunk_size}) runs one backward pass per "
            f"chunk, which DeepSpeed ZeRO-{stage} does not support within one optimizer step (its gradient "
            "partitioning assumes one backward per micro-step). Use DDP (recipes/accelerate/ddp.yaml) with "
            "GradCache, or ZeRO with optim.gradcache_chunk_size=null."
        )


def train(
    config: TrainConfig,
    module,
    examples: Sequence[TrainExample],
    *,
    accelerator=None,
    eval_hook: EvalHook | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Train `module` (an `Embedder` or a `Reranker`) on `examples` as `config` says; returns the final directory.

    `eval_hook(module, step) -> metrics` runs every `config.eval_every` steps and at the end; `on_step(step,
    logs)` after every optimizer step (progress reporting; an exception there interrupts training like a crash,
    and the run resumes from the last checkpoint).
    """
    from accelerate.utils import set_seed

    accelerator = accelerator or make_accelerator(config)
    check_backend(accelerator, config)
    set_seed(config.seed)
    optim = config.optim
    output_dir = Path(config.output_dir)

    multi_vector = check_multi_vector(config, module)
    make_trainable(module, config.model, multi_vector=multi_vector)
    module.train()
    trainable, total = count_parameters(module)
    accelerator.print(
        f"training {trainable:,} of {total:,} parameters on {accelerator.num_processes} process(es), "
        f"backend {accelerator.distributed_type.value}"
    )

    optimizer = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=optim.lr, weight_decay=optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(optim.warmup_steps, optim.max_steps))
    # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per
    # process, a schedule for a per-process batch. Checkpoints carry its state as JSON (see unime.train.checkpoint).
    # Token vectors come from `TokenVectors.forward`: DDP sees a forward pass, as it must to reduce gradients.
    model, optimizer = accelerator.prepare(TokenVectors(module) if multi_vector else module, optimizer)

    state = TrainerState()
    checkpoint = latest_checkpoint(output_dir) if config.resume else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, scheduler)
        accelerator.print(f"resumed from {checkpoint} (step {state.step})")
    if config.log_with:
        accelerator.init_trackers("unime", config=flat_config(config))

    collator, objective, encode = training_task(config, module, model, examples, accelerator)
    batches = micro_batches(examples, collator, config, accelerator, state)

    progress = tqdm(
        total=optim.max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    while state.step < optim.max_steps:
        losses = []
        for _ in range(optim.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(model):
                losses.append(training_step(model, encode, batch, objective, accelerator, optim.gradcache_chunk_size))
                grad_norm = None
                if accelerator.sync_gradients and optim.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        logs = {"loss": float(torch.stack(losses).mean()), "lr": scheduler.get_last_lr()[0]}
        scheduler.step()
        state.step += 1
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(
                f"loss became {logs['loss']} at step {state.step}; lower optim.lr or clip gradients"
            )
        if eval_hook is not None and config.eval_every and state.step % config.eval_every == 0:
            logs.update({f"eval/{k}": v for k, v in eval_hook(unwrap(accelerator, model), state.step).items()})
        if state.step % config.log_every == 0 or state.step == optim.max_steps:
            accelerator.log(logs, step=state.step)
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
        progress.update(1)
        if config.save_every and state.step % config.save_every == 0 and state.step < optim.max_steps:
            save_checkpoint(accelerator, output_dir, state, scheduler, config.keep_checkpoints)
        if on_step is not None:
            on_step(state.step, logs)
    progress.close()

    final_dir = output_dir / "final"
    accelerator.wait_for_everyone()
    unwrapped = unwrap(accelerator, model)
    if eval_hook is not None:
        metrics = eval_hook(unwrapped, state.step)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        accelerator.print("final evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    with full_parameters(accelerator, unwrapped):
        if accelerator.is_main_process:
            unwrapped.save(final_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"model saved to {final_dir}")
    return final_dir


def training_task(config: TrainConfig, module, model, examples: Sequence[TrainExample], accelerator):
    """What differs between an embedder and a reranker: the batches, the objective, and the model's output.

    Returns `(collator, objective, encode)`, where `encode(features)` is what the objective reads: normalised
    embeddings `[n, D]` of an embedder, token matrices and masks `([n, T, d], [n, T])` of a multi-vector
    embedder (`model` is then `TokenVectors`), answer logits `[n, 2]` of a reranker's pairs.
    """
    data, optim = config.data, config.optim
    if module.config.kind == "reranker":
        collator = RerankCollator(
            module,
            examples,
            num_negatives=data.num_negatives,
            random_negatives=data.random_negatives,
            chunk_size=optim.gradcache_chunk_size,
            sample_negatives=data.sample_negatives,
            seed=config.seed,
        )
        return collator, RerankObjective(config.loss), lambda features: model(features).float()  # [n, 2]

    if data.random_negatives:
        raise ConfigError("data.random_negatives applies to rerankers (model.kind: reranker)")
    # The saved directory lists the truncations this run trained, for every consumer (`unime_config.json`).
    module.config.matryoshka_dims = list(config.loss.matryoshka_dims)
    collator = EmbeddingCollator(
        module,
        teacher_cache=fill_teacher_cache(config, examples, accelerator),
        num_negatives=data.num_negatives,
        chunk_size=optim.gradcache_chunk_size,
        sample_negatives=data.sample_negatives,
        seed=config.seed,
    )
    if config.loss.name == "late_interaction":
        return collator, EmbeddingObjective(config.loss), model  # ([n, T, d], [n, T])
    normalize = module.config.normalize

    def encode(features):
        return finish_embeddings(model(features), normalize=normalize)  # [n, D]

    return collator, EmbeddingObjective(config.loss), encode


class TokenVectors(nn.Module):
    """An embedder whose forward gives token matrices and masks (`Embedder.embed_multi_vector`), to train them."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder.embed_multi_vector(features)  # [n, T, d], [n, T]


def unwrap(accelerator, model):
    """The trained embedder or reranker, without accelerate's wrappers or `TokenVectors`."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.embedder if isinstance(unwrapped, TokenVectors) else unwrapped


def check_multi_vector(config: TrainConfig, module) -> bool:
    """Whether this run trains a multi-vector head (loss `late_interaction`); refuses a head that would not train."""
    head = getattr(module, "multi_vector_head", None)
    if config.loss.name == "late_interaction":
        if head is None:
            raise ConfigError(
                f"loss.name late_interaction trains a multi-vector head, but {config.model.name_or_path} has none: "
                "set model.multi_vector.enabled: true (and its dim, e.g. 128) to add one"
            )
        return True
    if config.model.multi_vector.enabled:
        raise ConfigError(
            f"model.multi_vector adds a multi-vector head, which only loss.name late_interaction trains "
            f"(loss.name is {config.loss.name}); set model.multi_vector.enabled: false or change the loss"
        )
    return False


def fill_teacher_cache(config: TrainConfig, examples: Sequence[TrainExample], accelerator):
    """Stage 1: embed every training text with the teacher once, before training (None for other losses)."""
    if config.loss.name != "text_distill_kl":
        return None
    from unime.data.collator import distill_text
    from unime.train.teacher import distill_teacher_cache

    distill = config.distill
    cache = distill_teacher_cache(distill)
    texts = [distill_text(e, side) for e in examples for side in (e.query, e.positive)]
    # The main process fills the cache; the others then find every text in it.
    with accelerator.main_process_first():
        computed = cache.ensure(texts, show_progress_bar=accelerator.is_local_main_process)
    accelerator.print(f"teacher {distill.teacher}: {computed} texts embedded, {len(set(texts)) - computed} from cache")
    return cache


def full_parameters(accelerator, module):
    """Under ZeRO-3 each process holds a shard of every weight: gather them for saving (a no-op otherwise)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def training_step(model, encode, batch: TrainBatch, objective, accelerator, chunk_size: int | None) -> torch.Tensor:
    """Loss and backward for one micro-batch; returns the detached loss."""

    def compute_loss(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        return objective(embeddings, batch)

    if chunk_size is None:
        return encode_without_cache(encode, batch.chunks, compute_loss, accelerator.backward)
    # Chunk backward passes before the last skip DDP's all-reduce (only where this micro-step syncs at all).
    no_sync = (lambda: accelerator.no_sync(model)) if accelerator.sync_gradients else None
    return encode_with_grad_cache(encode, batch.chunks, compute_loss, accelerator.backward, no_sync=no_sync)


def micro_batches(
    examples: Sequence[TrainExample], collator: EmbeddingCollator, config: TrainConfig, accelerator, state: TrainerState
) -> Iterator[TrainBatch]:
    """Endless micro-batches for this process, epoch after epoch, from the position recorded in `state`.

    The sampler draws global batches (per-process size x processes, one source each when asked); process r
    takes rows r*b .. r*b+b-1, so N processes see exactly the batch one process would see with N x b.
    """
    per_process = config.optim.batch_size
    sampler = TrainBatchSampler(
        [e.source for e in examples],
        per_process * accelerator.num_processes,
        seed=config.seed,
        same_source=config.data.same_source_batches,
    )
    if not sampler.batches(0):
        raise ConfigError(
            f"{len(examples)} training examples cannot fill one batch of {per_process} x "
            f"{accelerator.num_processes} process(es)" + (" from one source" if config.data.same_source_batches else "")
        )
    start = accelerator.process_index * per_process
    while True:
        sampler.set_epoch(state.epoch, state.batches_in_epoch)
        for global_batch in sampler:
            state.batches_in_epoch += 1
            yield collator([examples[i] for i in global_batch[start : start + per_process]])
        state.epoch += 1
        state.batches_in_epoch = 0


def warmup_cosine(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak learning rate, then cosine decay to zero at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """The config as flat scalars, for trackers (TensorBoard's hparams take no lists or None)."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}{key}.", item)
        else:
            flat[prefix.rstrip(".")] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", asdict(config))
    return flat
