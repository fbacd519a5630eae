"""The one loading path (DESIGN.md, contract 1): the only module that calls `from_pretrained`.

Recipes, the encode API, sentence-transformers integration, the evaluation harness and the server all get
their models from `load`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.utils import cached_file

from unime.backbones import BackboneSpec, backbone_for_model_type, get_backbone
from unime.config import CONFIG_NAME, UnimeConfig
from unime.errors import ModelLoadError
from unime.multi_vector import HEAD_FILE, load_head

ADAPTER_CONFIG_NAME = "adapter_config.json"
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def load(
    name_or_path: str | os.PathLike,
    *,
    backbone: str | None = None,
    kind: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = False,
    trust_remote_code: bool = False,
    processor_kwargs: dict[str, Any] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
):
    """Load a unime model directory, a hub repository, or a plain Hugging Face checkpoint.

    Args:
        name_or_path: a local directory or a hub name. A unime model directory holds `unime_config.json`.
        backbone: only for a plain Hugging Face checkpoint (no `unime_config.json`): its registry name, or
            `"auto"` to detect it from `config.json`'s `model_type`. The model is then an embedder with the
            default prompts and last-token pooling.
        kind: `"embedder"`, `"reranker"` or `"multi_task"`: what to build from the weights; default: the
            directory's kind (an embedder for a plain checkpoint). Asking for a reranker (or a multi-task model)
            from an embedder directory starts one from that embedder's weights (to train it); asking a multi-task
            directory for an embedder or a reranker gives that head alone.
        dtype: `"auto"` (bfloat16 on a GPU that supports it, float32 otherwise), a name such as
            `"bfloat16"`, or a `torch.dtype`.
        device: where to put the model; default CUDA when available, else CPU.
        attn_implementation: `sdpa` (default), `eager`, or `flash_attention_2` (needs `unime[flash]`).
        adapter: a LoRA adapter directory to apply on top of the loaded model.
        merge_adapter: merge a loaded adapter into the weights (faster inference, no longer trainable as LoRA).
        trust_remote_code: allow model code from the hub; off unless asked.
        processor_kwargs: overrides for the processor (e.g. `{"max_pixels": 672 * 672}` for Qwen2-VL).
        revision, local_files_only: passed to the hub download.

    Returns:
        An `Embedder`, a `Reranker` or a `MultiTaskModel` (`unime.multi_task`), by the directory's `kind`.
    """
    source = str(name_or_path)
    hub = {"revision": revision, "local_files_only": local_files_only}
    config = _read_unime_config(source, hub)
    if config is None:
        config = _config_for_plain_checkpoint(source, backbone, trust_remote_code, hub)
    elif backbone not in (None, "auto", config.backbone):
        raise ModelLoadError(
            f"{source}: its {CONFIG_NAME} says backbone {config.backbone!r}, but backbone={backbone!r} was asked"
        )
    # A reranker (or a multi-task model's reranker) built from an embedder's weights needs its answer tokens.
    converting_to_reranker = kind in ("reranker", "multi_task") and config.kind == "embedder"
    if kind is not None and kind != config.kind:
        config = dataclasses.replace(config, kind=kind)
    if config.kind == "reranker":
        config = dataclasses.replace(config, multi_vector=None)  # a reranker has no multi-vector head
    spec = get_backbone(config.backbone)

    device = torch.device(device) if device is not None else _default_device()
    torch_dtype = _resolve_dtype(dtype, device)
    _check_attention(attn_implementation)

    adapter_dir = _local_or_cached_adapter(source, hub)
    weights_source = source
    if adapter_dir is not None:
        # The directory holds only a LoRA adapter: the weights come from the base it was trained on.
        weights_source = config.base_model or _adapter_base(adapter_dir)
    model = _load_weights(spec, weights_source, torch_dtype, attn_implementation, trust_remote_code, hub)
    for path in (source if adapter_dir is not None else None, adapter):
        if path is not None:
            model = _apply_adapter(model, str(path), merge_adapter, hub)

    processor = load_processor(spec, source, trust_remote_code, processor_kwargs, hub)
    if converting_to_reranker:
        # An embedder's (or a base checkpoint's) weights start a reranker: a tiny tokenizer lacks the answer
        # words as single tokens (real ones have them, and then nothing changes).
        from unime.reranker import add_answer_tokens

        add_answer_tokens(model, processor, (config.rerank.no_token, config.rerank.yes_token), seed=0)
    model.to(device).eval()
    if config.multi_vector is not None:
        hidden_size = model.config.get_text_config().hidden_size
        head = load_head(_local_or_cached_file(source, HEAD_FILE, hub), config.multi_vector, hidden_size)
        return _model_class(config.kind)(model, processor, config, multi_vector_head=head.to(device).eval())
    return _model_class(config.kind)(model, processor, config)


def _model_class(kind: str):
    from unime.embedder import Embedder
    from unime.multi_task import MultiTaskModel
    from unime.reranker import Reranker

    classes = {"embedder": Embedder, "reranker": Reranker, "multi_task": MultiTaskModel}
    if kind not in classes:
        raise ModelLoadError(f"models of kind {kind!r} cannot be loaded by this version of unime")
    return classes[kind]


def _local_or_cached_file(source: str, name: str, hub: dict) -> Path:
    """A file of a local model directory, or of a hub repository (downloaded); a missing one is left to the caller."""
    if Path(source).is_dir():
        return Path(source) / name
    resolved = cached_file(source, name, _raise_exceptions_for_missing_entries=False, **hub)
    return Path(resolved) if resolved else Path(source) / name


def _read_unime_config(source: str, hub: dict) -> UnimeConfig | None:
    if Path(source).is_dir():
        path = Path(source) / CONFIG_NAME
        return UnimeConfig.load(source) if path.is_file() else None
    if Path(source).exists():
        raise ModelLoadError(f"{source} is a file; expected a model directory or a hub name")
    try:
        resolved = cached_file(source, CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    except OSError as err:
        raise ModelLoadError(f"{source}: not a local directory, and the hub could not provide it ({err})") from err
    return UnimeConfig.load(Path(resolved).parent) if resolved else None


def _config_for_plain_checkpoint(source: str, backbone: str | None, trust_remote_code: bool, hub: dict) -> UnimeConfig:
    if backbone is None:
        raise ModelLoadError(
            f"{source} has no {CONFIG_NAME}, so it is not a unime model directory. To start from a plain "
            "Hugging Face checkpoint, pass backbone='auto' (detect it from config.json) or a registered "
            "backbone name."
        )
    asked = None if backbone == "auto" else get_backbone(backbone)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{source}: cannot read its config.json ({err})") from err
    spec = backbone_for_model_type(hf_config.model_type) if asked is None else asked
    if asked is not None and hf_config.model_type not in spec.model_types:
        raise ModelLoadError(
            f"{source}: its config.json has model_type {hf_config.model_type!r}, which backbone {backbone!r} "
            f"does not serve (it serves {', '.join(spec.model_types)}); pass backbone='auto' to detect it"
        )
    return UnimeConfig(backbone=spec.name)


def _load_weights(spec: BackboneSpec, source: str, dtype: torch.dtype, attn: str, trust_remote_code: bool, hub: dict):
    model_class = getattr(transformers, spec.model_class)
    try:
        return model_class.from_pretrained(
            source, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code, **hub
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"{source}: cannot load {spec.model_class} weights ({err})") from err


def load_processor(
    spec: BackboneSpec, source: str, trust_remote_code: bool, overrides: dict[str, Any] | None, hub: dict
):
    """A directory's processor alone (what vLLM prompt rendering needs), with the family's defaults."""
    processor_class = getattr(transformers, spec.processor_class)
    kwargs = {**spec.processor_defaults, **(overrides or {})}
    try:
        processor = processor_class.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs, **hub)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(f"{source}: cannot load its {spec.processor_class} ({err})") from err
    # Right padding keeps token positions independent of the batch (pooling handles either side).
    processor.tokenizer.padding_side = "right"
    return processor


def _local_or_cached_adapter(source: str, hub: dict) -> Path | None:
    path = _local_or_cached_file(source, ADAPTER_CONFIG_NAME, hub)
    return path.parent if path.is_file() else None


def _adapter_base(adapter_dir: Path) -> str:
    base = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter_dir}: the adapter names no base model (base_model_name_or_path)")
    return base


def _apply_adapter(model, adapter: str, merge: bool, hub: dict):
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=not merge, **hub)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{adapter}: cannot load the LoRA adapter ({err})") from err
    return model.merge_and_unload() if merge else model


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected 'auto', 'float32', 'bfloat16' or 'float16'")
    return resolved


def _check_attention(attn: str) -> None:
    if attn not in ATTENTION_IMPLEMENTATIONS:
        raise ModelLoadError(f"attn_implementation {attn!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("attn_implementation='flash_attention_2' needs flash-attn: pip install 'unime[flash]'")
