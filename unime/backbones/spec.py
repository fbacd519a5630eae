"""What unime needs to know about a backbone family, as data (DESIGN.md, contract 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin


@dataclass(frozen=True)
class TurnFormat:
    """The family's chat turn markup, from which unime builds its embedding prompt template.

    The rendered prompt is `bos + user_start + <user turn> + user_end + assistant_start`; the embedding is the
    hidden state at its last token, where the model is about to answer.
    """

    user_start: str
    """Text that opens the user turn, e.g. `<|im_start|>user\\n`."""
    user_end: str
    """Text that closes the user turn, e.g. `<|im_end|>\\n`."""
    assistant_start: str
    """Text that opens the assistant turn (the generation prompt), e.g. `<|im_start|>assistant\\n`."""
    image_placeholder: str
    """What stands for one image in the prompt; the processor expands it into the image's tokens."""
    bos: str = ""
    """Text put before everything (a BOS token for families whose template starts with one)."""


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: everything that differs between backbone families.

    Adding a backbone is one `BackboneSpec` (and its test); no code elsewhere branches on the family.
    """

    name: str
    """Registry name, e.g. `qwen2_vl`; stored as `backbone` in `unime_config.json`."""
    model_types: tuple[str, ...]
    """Hugging Face `config.model_type` values this entry serves (used to detect the family of a checkpoint)."""
    model_class: str
    """transformers class that holds the whole model with its LM head, e.g. `Qwen2VLForConditionalGeneration`."""
    processor_class: str
    """transformers processor class, e.g. `Qwen2VLProcessor`."""
    image_token: str
    """The tokenizer's image token (the one the processor repeats once per image feature)."""
    turn_format: TurnFormat
    """Chat markup used to build the embedding prompt template."""
    lora_target_modules: str
    """peft `target_modules` regex: the language model's attention and MLP projections (not the vision tower)."""
    vision_tower: str
    """Dotted attribute path of the vision encoder inside `model_class` (frozen in stage 1 and optionally later)."""
    projector: str
    """Dotted attribute path of the vision-to-language projector."""
    language_model: str
    """Dotted attribute path of the decoder inside `model_class`."""
    base_model: str = "model"
    """Attribute of `model_class` whose forward returns `last_hidden_state` without computing LM logits."""
    build_tiny: Callable[[int], tuple[PreTrainedModel, ProcessorMixin]] | None = field(default=None, repr=False)
    """Builds a tiny randomly initialised model and its processor offline, from a seed."""
    build_small: Callable[[int], tuple[PreTrainedModel, ProcessorMixin]] | None = field(default=None, repr=False)
    """Like `build_tiny`, but large enough to be compute-bound (benchmarks); None where the family has none."""
    example_checkpoints: tuple[str, ...] = ()
    """Hub names of real checkpoints of this family (documentation and config validation)."""
    processor_defaults: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments passed to the processor's `from_pretrained` unless the user overrides them."""
    batch_inputs: Callable[[Any, Sequence[str], Sequence[Sequence[Any]], dict[str, Any]], dict | None] | None = field(
        default=None, repr=False
    )
    """`(processor, prompts, images per prompt, tokenizer kwargs) -> features`: the processor's output for a batch,
    computed batch-wide (equal to the processor's, tested); it returns None, or is None, where the processor runs."""
    position_ids: Callable[[Any, dict], Any] | None = field(default=None, repr=False)
    """`(model config, features) -> position ids or None`: the positions the model would compute for itself,
    computed batch-wide (equal, tested) and passed in; None where the model computes them."""
