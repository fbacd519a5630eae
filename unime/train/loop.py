"""The one training loop (DESIGN.md, contract 6): every recipe trains through `train`.

It runs under plain Python, `torchrun` or `accelerate launch` (single process, DDP, DeepSpeed ZeRO-2/3):
the Accelerator picks the backend up from the environment.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
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
from unime.train.config import DataSettings, LossSettings, TrainConfig
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
    # Full fine-tuning with a trainable vision tower leaves it unused on text-only batches, and each head of a
    # multi-task model leaves the others' parameters unused in its backward pass: DDP must allow both.
    unused = (not config.model.lora.enabled and not config.model.freeze_vision) or config.model.kind == "multi_task"
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
    examples: Sequence[TrainExample] | Mapping[str, Sequence[TrainExample]],
    *,
    accelerator=None,
    eval_hook: EvalHook | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Train `module` (an `Embedder` or a `Reranker`) on `examples` as `config` says; returns the final directory.

    A `MultiTaskModel` (`model.kind: multi_task`) trains on `config.objectives`: `examples` then maps each active
    objective's name (`dense`, `multi_vector`, `rerank`) to its own examples, and every step sums the objectives'
    weighted losses, one micro-batch of each (`ObjectivesSettings`).

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
    # Token vectors come from `TokenVectors.forward` (a multi-task model's own forward gives every head's output):
    # DDP sees a forward pass, as it must to reduce gradients.
    multi_task = module.config.kind == "multi_task"
    model, optimizer = accelerator.prepare(
        TokenVectors(module) if multi_vector and not multi_task else module, optimizer
    )

    state = TrainerState()
    checkpoint = latest_checkpoint(output_dir) if config.resume else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, scheduler)
        accelerator.print(f"resumed from {checkpoint} (step {state.step})")
    if config.log_with:
        accelerator.init_trackers("unime", config=flat_config(config))

    tasks = training_streams(config, module, model, examples, accelerator, state)

    progress = tqdm(
        total=optim.max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    while state.step < optim.max_steps:
        losses = []
        for _ in range(optim.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                task_losses = {
                    task.name: training_step(
                        model,
                        task.encode,
                        next(task.batches),
                        task.objective,
                        accelerator,
                        optim.gradcache_chunk_size,
                        weight=task.weight,
                    )
                    for task in tasks
                }
                losses.append(torch.stack(list(task_losses.values())).sum())
                grad_norm = None
                if accelerator.sync_gradients and optim.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        logs = {"loss": float(torch.stack(losses).mean()), "lr": scheduler.get_last_lr()[0]}
        if multi_task:  # each objective's own (unweighted) loss of the last micro-step
            logs.update({f"loss/{task.name}": float(task_losses[task.name]) / task.weight for task in tasks})
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


@dataclass
class TrainingStream:
    """One objective of a run: its micro-batches, its objective, what it reads from the model, and its weight."""

    name: str
    weight: float
    objective: Any
    encode: Callable[[dict[str, torch.Tensor]], Any]
    batches: Iterator[TrainBatch]


def training_streams(
    config: TrainConfig,
    module,
    model,
    examples: Sequence[TrainExample] | Mapping[str, Sequence[TrainExample]],
    accelerator,
    state: TrainerState,
) -> list[TrainingStream]:
    """The run's objectives: the one of an embedder or reranker (weight 1, its position kept in `state`), or each
    active objective of a multi-task model, on its own examples through its own head of the shared `model`."""
    if module.config.kind != "multi_task":
        if isinstance(examples, Mapping):
            raise ConfigError("named example sets are for model.kind: multi_task; pass one list of examples")
        collator, objective, encode = training_task(config, module, model, examples, accelerator)
        return [
            TrainingStream(
                "loss", 1.0, objective, encode, micro_batches(examples, collator, config, accelerator, state)
            )
        ]
    active = config.objectives.active()
    if not active:
        raise ConfigError("model.kind multi_task: no objective has a weight above 0 (objectives.<name>.weight)")
    if not isinstance(examples, Mapping) or set(examples) != set(active):
        given = sorted(examples) if isinstance(examples, Mapping) else "one list"
        raise ConfigError(
            f"model.kind multi_task trains the objectives {sorted(active)}: pass their examples by name (got {given})"
        )
    # Every objective draws one micro-batch per micro-step: where each stands follows from the steps done.
    drawn = state.step * config.optim.gradient_accumulation_steps
    streams = []
    for name, settings in active.items():
        check_objective(name, settings.loss)
        view = module.reranker if name == "rerank" else module.embedder

        def forward(features, task=name):
            return model(features, task)

        collator, objective, encode = training_task(
            config, view, forward, examples[name], accelerator, loss=settings.loss, data=settings.data
        )
        batches = micro_batches(
            examples[name], collator, config, accelerator, TrainerState(), data=settings.data, skip=drawn
        )
        streams.append(TrainingStream(name, settings.weight, objective, encode, batches))
    return streams


def check_objective(name: str, loss: LossSettings) -> None:
    """A multi-task objective's loss must train its head."""
    if name == "multi_vector" and loss.name != "late_interaction":
        raise ConfigError(
            f"objectives.multi_vector.loss.name: the multi-vector head trains with late_interaction, not {loss.name}"
        )
    if name == "dense" and loss.name in ("late_interaction", "text_distill_kl"):
        raise ConfigError(
            f"objectives.dense.loss.name {loss.name!r}: the pooled vector trains with an embedding loss (stage-1 "
            "distillation runs alone, as kind embedder; start the multi-task run from its model)"
        )


def training_task(
    config: TrainConfig,
    module,
    model,
    examples: Sequence[TrainExample],
    accelerator,
    *,
    loss: LossSettings | None = None,
    data: DataSettings | None = None,
):
    """What differs between an embedder and a reranker: the batches, the objective, and the model's output.

    Returns `(collator, objective, encode)`, where `encode(features)` is what the objective reads: normalised
    embeddings `[n, D]` of an embedder, token matrices and masks `([n, T, d], [n, T])` of a multi-vector
    embedder (`model` is then `TokenVectors`), answer logits `[n, 2]` of a reranker's pairs. `model` is what
    computes the head's output from features (a multi-task model's head); `loss` and `data` default to the config's.
    """
    loss, data, optim = loss or config.loss, data or config.data, config.optim
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
        return collator, RerankObjective(loss), lambda features: model(features).float()  # [n, 2]

    if data.random_negatives:
        raise ConfigError("data.random_negatives applies to rerankers (model.kind: reranker)")
    # The saved directory lists the truncations this run trained, for every consumer (`unime_config.json`).
    module.config.matryoshka_dims = list(loss.matryoshka_dims)
    collator = EmbeddingCollator(
        module,
        teacher_cache=fill_teacher_cache(config, examples, accelerator) if loss is config.loss else None,
        num_negatives=data.num_negatives,
        chunk_size=optim.gradcache_chunk_size,
        sample_negatives=data.sample_negatives,
        seed=config.seed,
    )
    if loss.name == "late_interaction":
        return collator, EmbeddingObjective(loss), model  # ([n, T, d], [n, T])
    normalize = module.config.normalize

    def encode(features):
        return finish_embeddings(model(features), normalize=normalize)  # [n, D]

    return collator, EmbeddingObjective(loss), encode


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
    """Whether this run trains a multi-vector head (loss `late_interaction`, or a multi-task run's `multi_vector`
    objective); refuses a head that would not train."""
    head = getattr(module, "multi_vector_head", None)
    if module.config.kind == "multi_task":
        trains = "multi_vector" in config.objectives.active()
        if trains and head is None:
            raise ConfigError(
                f"objectives.multi_vector trains a multi-vector head, but {config.model.name_or_path} has none: set "
                "model.multi_vector.enabled: true (and its dim, e.g. 128) to add one"
            )
        if config.model.multi_vector.enabled and not trains:
            raise ConfigError(
                "model.multi_vector adds a multi-vector head, which objectives.multi_vector (weight 0) "
                "would not train; give it a weight or set model.multi_vector.enabled: false"
            )
        return trains
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


def training_step(
    model, encode, batch: TrainBatch, objective, accelerator, chunk_size: int | None, *, weight: float = 1.0
) -> torch.Tensor:
    """Loss (times `weight`, an objective's share of a multi-task step) and backward for one micro-batch; returns
    the detached weighted loss."""

    def compute_loss(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = objective(embeddings, batch)
        return loss if weight == 1.0 else loss * weight

    if chunk_size is None:
        return encode_without_cache(encode, batch.chunks, compute_loss, accelerator.backward)
    # Chunk backward passes before the last skip DDP's all-reduce (only where this micro-step syncs at all).
    no_sync = (lambda: accelerator.no_sync(model)) if accelerator.sync_gradients else None
    return encode_with_grad_cache(encode, batch.chunks, compute_loss, accelerator.backward, no_sync=no_sync)


def micro_batches(
    examples: Sequence[TrainExample],
    collator: EmbeddingCollator,
    config: TrainConfig,
    accelerator,
    state: TrainerState,
    *,
    data: DataSettings | None = None,
    skip: int = 0,
) -> Iterator[TrainBatch]:
    """Endless micro-batches for this process, epoch after epoch, from the position recorded in `state`, moved on
    by `skip` micro-batches (a resumed multi-task objective); `data` defaults to the config's.

    The sampler draws global batches (per-process size x processes, one source each when asked); process r
    takes rows r*b .. r*b+b-1, so N processes see exactly the batch one process would see with N x b.
    """
    per_process = config.optim.batch_size
    same_source = (data or config.data).same_source_batches
    sampler = TrainBatchSampler(
        [e.source for e in examples], per_process * accelerator.num_processes, seed=config.seed, same_source=same_source
    )
    if not sampler.batches(0):
        raise ConfigError(
            f"{len(examples)} training examples cannot fill one batch of {per_process} x "
            f"{accelerator.num_processes} process(es)" + (" from one source" if same_source else "")
        )
    while skip:  # whole epochs first, then into the current one; only batch counts, nothing is collated
        left = len(sampler.batches(state.epoch)) - state.batches_in_epoch
        if skip < left:
            state.batches_in_epoch, skip = state.batches_in_epoch + skip, 0
        else:
            state.epoch, state.batches_in_epoch, skip = state.epoch + 1, 0, skip - left
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
