"""The embedder: a multimodal LLM whose last hidden states, pooled, are the embedding.

`Embedder.encode` follows sentence-transformers' `SentenceTransformer.encode` (same argument names and
return types), so code written for one works with the other.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from unime.backbone_module import BackboneModule
from unime.config import UnimeConfig
from unime.errors import ConfigError, InvalidInputError
from unime.inputs import Input, is_single_input, load_image, parse_inputs
from unime.multi_vector import MultiVectorHead, maxsim_scores, token_mask
from unime.pass_planning import shape_sorted_batches
from unime.pooling import finish_embeddings, pool
from unime.prompts import PromptRenderer, apply_embedding_template


class Embedder(BackboneModule):
    """A backbone, its processor and the unime config that says how inputs become vectors.

    Get one with `unime.load(...)` (or `unime.build_tiny(...)` for a tiny offline model).
    """

    def __init__(
        self, model: nn.Module, processor: Any, config: UnimeConfig, multi_vector_head: MultiVectorHead | None = None
    ):
        super().__init__(model, processor, config)
        apply_embedding_template(processor, self.spec.turn_format, config.prompts)
        self._renderer = PromptRenderer(processor)
        self.multi_vector_head: MultiVectorHead | None = None
        if multi_vector_head is not None or config.multi_vector is not None:
            self.set_multi_vector_head(multi_vector_head)

    def set_multi_vector_head(self, head: MultiVectorHead | None) -> None:
        """Attach a multi-vector head (or remove it with None); `config.multi_vector` follows."""
        if head is None:
            if self.config.multi_vector is not None and self.multi_vector_head is None:
                raise ConfigError("the config records a multi_vector head, but none was given")
            self.config.multi_vector = None
        elif head.custom_text_proj.in_features != self.hidden_size:
            raise ConfigError(
                f"the multi-vector head reads hidden size {head.custom_text_proj.in_features}, "
                f"but the backbone's is {self.hidden_size}"
            )
        else:
            self.config.multi_vector = head.config
            head.to(self.device)
        self.multi_vector_head = head

    # ----------------------------------------------------------------------------------------------------
    # Tensors in, tensors out (what training uses)
    # ----------------------------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return self.hidden_size

    def tokenize(
        self,
        items: Sequence[Input],
        instruction: str | Sequence[str | None] | None = None,
        indices: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Backbone inputs for a batch: render each input's prompt, decode images, tokenize, pad.

        Gives the same ids and pixels as the processor's `apply_chat_template` on the inputs' messages (the
        path sentence-transformers takes), with one template rendering per prompt shape instead of per input.
        `instruction` is one for all items or one per item (training rows carry their own). `indices` are the
        items' positions in the caller's list, used to name a failing input.
        """
        indices = list(indices) if indices is not None else list(range(len(items)))
        instructions = (
            [instruction] * len(items) if instruction is None or isinstance(instruction, str) else instruction
        )
        prompts = [
            self._renderer.render(item, item_instruction)
            for item, item_instruction in zip(items, instructions, strict=True)
        ]
        images = [
            [load_image(index, item.image)] if item.image is not None else []
            for index, item in zip(indices, items, strict=True)
        ]
        return self.processor_features(prompts, images)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (not yet normalised) embeddings `[batch, dim]` of tokenized inputs."""
        hidden = self.last_hidden_state(features)  # [B, T, D]
        return pool(hidden, features["attention_mask"].to(hidden.device), self.config.pooling)  # [B, D]

    def embed(self, features: dict[str, torch.Tensor], truncate_dim: int | None = None) -> torch.Tensor:
        """Final embeddings `[batch, dim]`: pooled, truncated (matryoshka) and normalised as configured."""
        return finish_embeddings(self(features), normalize=self.config.normalize, truncate_dim=truncate_dim)

    def embed_multi_vector(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors `[batch, seq, dim]` (unit norm) and the `[batch, seq]` boolean mask of those that count."""
        head = self._require_multi_vector_head()
        hidden = self.last_hidden_state(features)  # [B, T, D]
        image_token_id = self.processor.tokenizer.convert_tokens_to_ids(self.spec.image_token)
        mask = token_mask(features, head.config, image_token_id).to(hidden.device)  # [B, T]
        return head(hidden), mask  # [B, T, dim], [B, T]

    def _require_multi_vector_head(self) -> MultiVectorHead:
        if self.multi_vector_head is None:
            source = self.hf_model.config.name_or_path or "this model"
            raise ConfigError(
                f"{source} has no multi-vector head (its unime_config.json has no multi_vector section), so it "
                "cannot give output='multi_vector'; add one with unime.multi_vector.add_multi_vector_head(...) and "
                "train it"
            )
        return self.multi_vector_head

    # ----------------------------------------------------------------------------------------------------
    # The sentence-transformers-compatible encode API
    # ----------------------------------------------------------------------------------------------------
    def encode(
        self,
        inputs: Any,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool | None = None,
        truncate_dim: int | None = None,
        output: Literal["single_vector", "multi_vector"] = "single_vector",
    ) -> np.ndarray | torch.Tensor | list[np.ndarray] | list[torch.Tensor]:
        """Embed texts, images (PIL or path) and `{"text", "image"}` dicts, mixed in one call.

        Args:
            inputs: one input or a list of them (see `unime.inputs`).
            prompt_name: `"query"` or `"document"`: use the instruction configured for it.
            prompt: an explicit instruction; wins over `prompt_name`.
            batch_size: inputs per forward pass. Results do not depend on it.
            show_progress_bar: default: on for more than one batch when stderr is a terminal.
            convert_to_numpy / convert_to_tensor: return a numpy array (default) or a torch tensor.
            normalize_embeddings: default: the model's `normalize` setting.
            truncate_dim: keep the first dims (matryoshka), applied before normalisation.
            output: `single_vector` (one pooled vector per input) or `multi_vector` (one unit vector per kept
                token, from the directory's multi-vector head).

        Returns:
            `[n, dim]` for a list (in input order), `[dim]` for a single input. With `output="multi_vector"`: a
            list of `[n_tokens_i, dim]` float32 matrices holding the kept tokens only (the mask applied, as
            sentence-transformers' MultiVectorEncoder returns them), one matrix for a single input.
        """
        single = is_single_input(inputs)
        items = parse_inputs([inputs] if single else inputs)
        instruction = self.instruction_for(prompt_name, prompt)
        if output == "multi_vector":
            if truncate_dim is not None or normalize_embeddings is False:
                raise ValueError(
                    "output='multi_vector' gives unit token vectors: truncate_dim and "
                    "normalize_embeddings=False do not apply to it"
                )
            self._require_multi_vector_head()
        elif output != "single_vector":
            raise ValueError(f"output must be 'single_vector' or 'multi_vector', got {output!r}")
        normalize = self.config.normalize if normalize_embeddings is None else normalize_embeddings
        if truncate_dim is not None and not 0 < truncate_dim <= self.embedding_dim:
            raise ValueError(f"truncate_dim must be in 1..{self.embedding_dim}, got {truncate_dim}")

        # Same-modality, similar-size inputs share a batch: text-only batches carry no pixel values and
        # little padding. Results are scattered back, so the order of the batches does not matter.
        batches = shape_sorted_batches(
            items, batch_size, lambda item: (item.has_image, item.image_pixels, len(item.text or ""))
        )
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 1 and sys.stderr.isatty()
        pooled = torch.empty(len(items), self.embedding_dim, dtype=torch.float32)
        token_vectors: list[torch.Tensor] = [torch.empty(0)] * len(items)
        was_training = self.training
        self.eval()
        # A worker thread prepares batch k+1 (prompt rendering, image decoding and resizing, tokenization) while
        # the model runs batch k. The two overlap where the forward pass releases the GIL: on a GPU, or with a
        # real-size model on a CPU; on a tiny CPU model both are Python-bound and it is a wash.
        prepare = partial(self._prepare_batch, items, instruction)
        try:
            with torch.inference_mode(), ThreadPoolExecutor(max_workers=1) as worker:
                upcoming = worker.submit(prepare, batches[0]) if batches else None
                for position, batch in enumerate(tqdm(batches, desc="encode", disable=not show_progress_bar)):
                    features = upcoming.result()
                    if position + 1 < len(batches):
                        upcoming = worker.submit(prepare, batches[position + 1])
                    if output == "multi_vector":
                        vectors, mask = self.embed_multi_vector(features)  # [B, T, dim], [B, T]
                        vectors, mask = vectors.float().cpu(), mask.cpu()
                        for row, index in enumerate(batch):
                            token_vectors[index] = vectors[row][mask[row]]  # [n_tokens, dim]
                    else:
                        pooled[batch] = self(features).float().cpu()
        finally:
            self.train(was_training)

        if output == "multi_vector":
            matrices = (
                token_vectors if convert_to_tensor or not convert_to_numpy else [m.numpy() for m in token_vectors]
            )
            return matrices[0] if single else matrices

        embeddings = finish_embeddings(pooled, normalize=normalize, truncate_dim=truncate_dim)
        if single:
            embeddings = embeddings[0]
        if convert_to_tensor:
            return embeddings
        return embeddings.numpy() if convert_to_numpy else list(embeddings)

    def _prepare_batch(
        self, items: Sequence[Input], instruction: str | None, batch: list[int]
    ) -> dict[str, torch.Tensor]:
        return self.tokenize([items[i] for i in batch], instruction, indices=batch)

    def set_prompts(self, **changes: str) -> None:
        """Change instructions or summary lines (fields of `PromptConfig`); the prompt template follows."""
        self.config.prompts = dataclasses.replace(self.config.prompts, **changes)
        apply_embedding_template(self.processor, self.spec.turn_format, self.config.prompts)

    def encode_query(self, inputs: Any, **kwargs: Any) -> np.ndarray | torch.Tensor:
        """`encode` with the query instruction (unless `prompt`/`prompt_name` says otherwise)."""
        kwargs.setdefault("prompt_name", "query")
        return self.encode(inputs, **kwargs)

    def encode_document(self, inputs: Any, **kwargs: Any) -> np.ndarray | torch.Tensor:
        """`encode` with the document instruction (unless `prompt`/`prompt_name` says otherwise)."""
        kwargs.setdefault("prompt_name", "document")
        return self.encode(inputs, **kwargs)

    def instruction_for(self, prompt_name: str | None, prompt: str | None) -> str | None:
        if prompt is not None:
            return prompt
        if prompt_name is None:
            return None
        prompts = {"query": self.config.prompts.query_instruction, "document": self.config.prompts.document_instruction}
        if prompt_name not in prompts:
            raise InvalidInputError(None, f"unknown prompt_name {prompt_name!r}; expected one of {sorted(prompts)}")
        return prompts[prompt_name] or None

    @property
    def prompts(self) -> dict[str, str]:
        """Named instructions, as sentence-transformers exposes them."""
        return {"query": self.config.prompts.query_instruction, "document": self.config.prompts.document_instruction}

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        """Pairwise similarity `[len(a), len(b)]` of two embedding matrices, by the configured function."""
        a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, dtype=torch.float32)
        b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b, dtype=torch.float32)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [n, d], [m, d]
        if self.config.similarity_fn_name == "cosine":
            a = torch.nn.functional.normalize(a, dim=-1)
            b = torch.nn.functional.normalize(b, dim=-1)
        return a @ b.T  # [n, m]

    def maxsim(self, queries: Any, documents: Any, *, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Late-interaction scores `[len(queries), len(documents)]` of token matrices from
        `encode(..., output="multi_vector")` (lists of `[n_tokens, dim]`; a single matrix counts as a list of one).
        `compute_dtype=torch.bfloat16` scores in bf16 (`unime.late_interaction.maxsim`)."""
        queries = [queries] if _is_one_matrix(queries) else list(queries)
        documents = [documents] if _is_one_matrix(documents) else list(documents)
        return maxsim_scores(queries, documents, compute_dtype=compute_dtype)


def _is_one_matrix(value: Any) -> bool:
    return isinstance(value, np.ndarray | torch.Tensor) and value.ndim == 2
