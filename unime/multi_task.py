"""One checkpoint, three heads: the pooled vector, the multi-vector head and the yes/no reranker on one base.

A `MultiTaskModel` holds one backbone (and its peft adapter while training) and one multi-vector head, and two
views of them: an `Embedder` (pooled vectors, token vectors) and a `Reranker` (p(yes) of a pair). The views are
the existing classes over the very same modules, so each head computes exactly what a single-purpose model does,
and the base weights are in memory once. Each view has its own copy of the processor, because the embedding and
the judge prompts are two chat templates.

Design: shared weights, not per-task adapters. All three heads read the same backbone weights; the tasks differ
by prompt (the embedding template or the judge template) and by what is read from the last hidden states (pooled
state, projected token states, the yes/no rows of the LM head). Per-task LoRA adapters (jina-embeddings-v4) would
give three sets of merged weights, and a directory holds one weights file that every consumer reads as is:
sentence-transformers, colpali-engine and vLLM know nothing of switching adapters inside one directory.

Directory layout (`save`):
    (root)      an embedder directory with the multi-vector head: `SentenceTransformer(dir)` gives the pooled
                vector, `MultiVectorEncoder(dir)` the token vectors; `unime_config.json` says kind `multi_task`
    reranker/   a reranker directory on the same weights: its own processor (the judge template),
                `unime_config.json` of kind reranker and the CrossEncoder files; its `config.json` and weights files
                are relative links to the root's (no second copy), so `CrossEncoder(dir + "/reranker")` and
                `unime.load(dir + "/reranker")` give the reranker's scores.
The projection is in `multi_vector_head.safetensors` only: the ColQwen2 copy that a Qwen2-VL embedder's weights file
carries for colpali-engine would make vLLM's yes/no scorer refuse the shared file (`unime.saving`).
sentence-transformers reads one `modules.json` and one `config_sentence_transformers.json` at a model's root, whose
`model_type` makes it a SentenceTransformer or a CrossEncoder: one root cannot be both, hence the subfolder.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from unime.backbones import get_backbone
from unime.config import CONFIG_NAME, MultiVectorConfig, UnimeConfig
from unime.embedder import Embedder
from unime.errors import ConfigError
from unime.multi_vector import MultiVectorHead, build_head
from unime.reranker import Reranker, add_answer_tokens
from unime.retrieve_rerank import RankedCandidates, rerank_shortlists
from unime.saving import _replace_directory, save_model_directory, write_cross_encoder_files

RERANKER_FOLDER = "reranker"
"""The subfolder of a multi-task directory that holds its reranker (CrossEncoder) files."""
TASKS = ("dense", "multi_vector", "rerank")
"""What `MultiTaskModel.forward` computes: pooled vectors, token vectors and masks, or answer logits."""
Task = Literal["dense", "multi_vector", "rerank"]
# Files of a saved backbone that the reranker folder links to instead of copying.
_SHARED_FILE_PATTERNS = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json")


class MultiTaskModel(nn.Module):
    """A backbone with a pooled-vector head, a multi-vector head and a yes/no reranker, sharing its weights.

    Get one with `unime.load(dir)` for a directory of kind `multi_task`, or `from_embedder` / `build_tiny_multi_task`.
    Registered submodules: the backbone (`model`) and the multi-vector head, once each; `embedder` and `reranker`
    are views over them (not submodules), so `parameters()` and checkpoints hold every weight once.
    """

    def __init__(
        self, model: nn.Module, processor: Any, config: UnimeConfig, multi_vector_head: MultiVectorHead | None = None
    ):
        super().__init__()
        self.model = model
        self.multi_vector_head = multi_vector_head
        embedder_config = dataclasses.replace(config, kind="embedder")
        reranker_config = dataclasses.replace(config, kind="reranker", multi_vector=None)
        # The judge template replaces the embedding template on its processor: each view gets its own processor.
        views = {
            "embedder": Embedder(model, processor, embedder_config, multi_vector_head=multi_vector_head),
            "reranker": Reranker(model, copy.deepcopy(processor), reranker_config),
        }
        object.__setattr__(self, "_views", views)  # not submodules: the weights are registered above, once
        self.train(model.training)

    def train(self, mode: bool = True) -> MultiTaskModel:
        # The views keep their own mode flag, which their encode and predict restore after running.
        super().train(mode)
        for view in self._views.values():
            view.train(mode)
        return self

    def set_multi_vector_head(self, head: MultiVectorHead | None) -> None:
        """Attach a multi-vector head (or remove it with None), as `Embedder.set_multi_vector_head`."""
        self.multi_vector_head = head

    def __setattr__(self, name: str, value: Any) -> None:
        # Attaching an adapter replaces the backbone (`make_trainable`): both views follow.
        if name in ("model", "multi_vector_head") and "_views" in self.__dict__:
            if name == "model":
                for view in self._views.values():
                    view.model = value
            else:
                self._views["embedder"].set_multi_vector_head(value)
        super().__setattr__(name, value)

    # ------------------------------------------------------------------------------------------------------------
    # The parts the loaders, savers and training read (as on an Embedder)
    # ------------------------------------------------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        """The pooled-vector and multi-vector heads, as an `Embedder` over the shared backbone."""
        return self._views["embedder"]

    @property
    def reranker(self) -> Reranker:
        """The yes/no reranker, as a `Reranker` over the shared backbone."""
        return self._views["reranker"]

    @property
    def config(self) -> UnimeConfig:
        """The directory's `unime_config.json`: kind `multi_task`, the embedder's settings and the reranker's."""
        return dataclasses.replace(self.embedder.config, kind="multi_task", rerank=self.reranker.config.rerank)

    @property
    def spec(self):
        return self.embedder.spec

    @property
    def processor(self):
        """The embedding processor (the root directory's)."""
        return self.embedder.processor

    @property
    def hf_model(self) -> nn.Module:
        return self.embedder.hf_model

    @property
    def hidden_size(self) -> int:
        return self.embedder.hidden_size

    @property
    def device(self) -> torch.device:
        return self.embedder.device

    def forward(self, features: dict[str, torch.Tensor], task: Task) -> Any:
        """One head on tokenized inputs: `dense` pooled vectors `[B, D]` (not normalised), `multi_vector` token
        vectors and mask `([B, T, d], [B, T])`, `rerank` answer logits `[B, 2]` of tokenized pairs."""
        if task == "dense":
            return self.embedder(features)
        if task == "multi_vector":
            return self.embedder.embed_multi_vector(features)
        if task == "rerank":
            return self.reranker(features)
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    # ------------------------------------------------------------------------------------------------------------
    # The public API: the embedder's encode, the reranker's predict and rank
    # ------------------------------------------------------------------------------------------------------------
    def encode(self, inputs: Any, *, output: str = "dense", **kwargs: Any) -> np.ndarray | torch.Tensor | list:
        """`Embedder.encode`; `output` is `dense` (also `single_vector`: one pooled vector per input) or
        `multi_vector` (a token matrix per input)."""
        if output == "dense":
            output = "single_vector"
        return self.embedder.encode(inputs, output=output, **kwargs)

    def encode_query(self, inputs: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("prompt_name", "query")
        return self.encode(inputs, **kwargs)

    def encode_document(self, inputs: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("prompt_name", "document")
        return self.encode(inputs, **kwargs)

    def similarity(self, a: Any, b: Any) -> torch.Tensor:
        return self.embedder.similarity(a, b)

    def maxsim(self, queries: Any, documents: Any) -> torch.Tensor:
        return self.embedder.maxsim(queries, documents)

    def predict(self, pairs: Any, **kwargs: Any) -> Any:
        """`Reranker.predict`: p(yes) of (query, document) pairs."""
        return self.reranker.predict(pairs, **kwargs)

    def set_rerank_prompt(self, **changes: str) -> None:
        """`Reranker.set_rerank_prompt`: the judge prompt or default instruction of the reranker head."""
        self.reranker.set_rerank_prompt(**changes)

    def rank(self, query: Any, documents: Any, **kwargs: Any) -> list[dict[str, Any]]:
        """`Reranker.rank`: documents ordered by p(yes), best first."""
        return self.reranker.rank(query, documents, **kwargs)

    def retrieve_and_rerank(
        self,
        queries: Sequence[Any],
        documents: Sequence[Any],
        *,
        recall: Literal["dense", "multi_vector"] = "dense",
        top_k_candidates: int = 50,
        fusion_weight: float | None = None,
        batch_size: int = 32,
    ) -> list[RankedCandidates]:
        """Retrieve, then rerank, with this one model: each query's `top_k_candidates` documents by the pooled
        vectors' similarity (`recall="dense"`) or by MaxSim of the token matrices (`"multi_vector"`), reordered by
        the yes/no head (`fusion_weight`: retrieval + w * p(yes), as `unime.retrieve_rerank`). One per query."""
        if recall == "dense":
            query_vectors = self.encode_query(queries, batch_size=batch_size, convert_to_tensor=True)  # [Q, D]
            document_vectors = self.encode_document(documents, batch_size=batch_size, convert_to_tensor=True)
            scores = self.similarity(query_vectors, document_vectors)  # [Q, C]
        elif recall == "multi_vector":
            query_tokens = self.encode_query(queries, output="multi_vector", batch_size=batch_size)
            document_tokens = self.encode_document(documents, output="multi_vector", batch_size=batch_size)
            scores = self.maxsim(query_tokens, document_tokens)  # [Q, C]
        else:
            raise ValueError(f"recall must be 'dense' or 'multi_vector', got {recall!r}")
        return rerank_shortlists(
            scores,
            queries,
            documents,
            self.reranker,
            top_k_candidates=top_k_candidates,
            fusion_weight=fusion_weight,
            batch_size=batch_size,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, merge_lora: bool = True) -> None:
        """Write the directory (module docstring): the embedder at the root, the reranker in `reranker/`, one
        weights file. `merge_lora=False` is refused: an adapter-only directory has no weights to share."""
        if not merge_lora:
            raise ConfigError("a multi-task directory is saved with merged weights (merge_lora=True)")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.saving-"))
        try:
            # No ColQwen2 copy of the projection in the shared weights: vLLM's yes/no scorer reads that file through
            # `reranker/` and refuses a tensor it does not know (`custom_text_proj`).
            root = save_model_directory(self.embedder, staging / "model", colpali_copy=False)
            self.config.save(root)
            write_reranker_folder(self.reranker, root)
            _replace_directory(root, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def write_reranker_folder(reranker: Reranker, root: Path) -> Path:
    """`root/reranker`: the reranker's processor, config and CrossEncoder files, its weights linked to the root's."""
    folder = root / RERANKER_FOLDER
    folder.mkdir()
    reranker.processor.save_pretrained(folder)
    dataclasses.replace(reranker.config, multi_vector=None).save(folder)
    write_cross_encoder_files(folder, yes_token_id=reranker.yes_token_id, no_token_id=reranker.no_token_id)
    shared = sorted({path for pattern in _SHARED_FILE_PATTERNS for path in root.glob(pattern)})
    for path in shared:
        # A relative link: the directory can move or be uploaded (the hub stores one blob per content) whole.
        (folder / path.name).symlink_to(Path("..") / path.name)
    return folder


def from_embedder(embedder: Embedder, *, seed: int = 0) -> MultiTaskModel:
    """A multi-task model over an embedder's backbone, processor and head (the embedder's modules are reused).

    A tiny tokenizer gets the reranker's answer words as single tokens first (real ones have them already).
    """
    config = embedder.config
    add_answer_tokens(embedder.model, embedder.processor, (config.rerank.no_token, config.rerank.yes_token), seed)
    head = embedder.multi_vector_head
    return MultiTaskModel(embedder.model, embedder.processor, dataclasses.replace(config, kind="multi_task"), head)


def build_tiny_multi_task(
    backbone: str = "qwen2_vl", *, seed: int = 0, multi_vector: MultiVectorConfig | None = None
) -> MultiTaskModel:
    """A tiny multi-task model built in code (seeded): the tiny embedder's backbone, answer tokens, and a
    multi-vector head when `multi_vector` is given."""
    spec = get_backbone(backbone)
    model, processor = spec.build_tiny(seed)
    config = UnimeConfig(backbone=spec.name, kind="multi_task")
    add_answer_tokens(model, processor, (config.rerank.no_token, config.rerank.yes_token), seed)
    hidden_size = model.config.get_text_config().hidden_size
    head = build_head(hidden_size, multi_vector, seed=seed) if multi_vector is not None else None
    return MultiTaskModel(model, processor, dataclasses.replace(config, multi_vector=multi_vector), head)


def is_multi_task_directory(directory: str | os.PathLike) -> bool:
    path = Path(directory) / CONFIG_NAME
    return path.is_file() and UnimeConfig.load(directory).kind == "multi_task"
