"""`unime_config.json`: what every consumer of a saved model directory needs to use it the same way.

The model directory is the contract between training, the encode API, sentence-transformers, the
evaluation harness and the server (DESIGN.md, contract 2). This file holds the part of that contract that
Hugging Face's own files do not: what kind of model it is, how inputs are prompted, and how hidden states
become vectors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unime.atomic import write_json_atomic
from unime.errors import ConfigError
from unime.pooling import POOLING_MODES, PoolingMode

CONFIG_NAME = "unime_config.json"
KINDS = ("embedder", "reranker", "multi_task")
FORMAT_VERSION = 1


@dataclass
class PromptConfig:
    """How an input becomes the user turn of the backbone's chat template (UniME / E5-V style).

    The user turn is `[instruction]` `[image]` `[text]` `[summary]`: the summary line asks the model to
    compress what it read into its next token, whose hidden state is the embedding.
    """

    query_instruction: str = ""
    """Instruction put before every query (`encode_query`, `prompt_name="query"`); empty for none."""
    document_instruction: str = ""
    """Instruction put before every document (`encode_document`, `prompt_name="document"`)."""
    image_summary: str = "Summarize above image in one word:"
    """Closing line for an input that is an image only."""
    text_summary: str = "Summarize above sentence in one word:"
    """Closing line for an input that is text only."""
    image_text_summary: str = "Summarize above image and sentence in one word:"
    """Closing line for an input with both an image and text."""


# The reranking paper's (GMR) judge prompt: a yes/no question whose answer token carries the relevance score.
GMR_SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)


@dataclass
class RerankConfig:
    """How a reranker prompts a (query, document) pair and reads its score (used when `kind` is reranker).

    The prompt is `<system prompt>` `<Instruct>: ...` `<Query>: [images][text]` `<Document>: [images][text]`,
    then the assistant turn opens; the score is p(yes) = softmax([z_no, z_yes])[yes] at that last position.
    """

    yes_token: str = "yes"
    """The token whose logit means relevant (must be one token of the tokenizer)."""
    no_token: str = "no"
    """The token whose logit means not relevant (must be one token of the tokenizer)."""
    system_prompt: str = GMR_SYSTEM_PROMPT
    """The judge's task statement, at the head of the user turn."""
    default_instruction: str = "Judge whether the document is relevant to the query."
    """The instruction when a call gives none."""


MULTI_VECTOR_TOKENS = ("all", "image")


@dataclass
class MultiVectorConfig:
    """A multi-vector (late-interaction, ColPali-style) head: one small unit vector per token.

    The head projects every last hidden state to `dim` and L2-normalises it; its weights are
    `multi_vector_head.safetensors` beside the backbone's. Padding is always masked out. Every other token of the
    rendered prompt is kept by default - instruction, chat-template and summary tokens included - as ColPali and
    ColQwen do for queries and documents and as vLLM's token-embedding pooling and sentence-transformers'
    MultiVectorEncoder return them, so every consumer scores the same token set; the template tokens, identical
    across inputs, act as learnt query-expansion slots (ColBERT).
    """

    dim: int = 128
    """Size of each token vector (ColPali and ColQwen use 128)."""
    tokens: Literal["all", "image"] = "all"
    """Tokens kept: `all` non-padding tokens, or `image`: only the image-patch tokens of an input that has an
    image (colpali-engine's `mask_non_image_embeddings`, about halving an image index); text-only inputs keep all
    their tokens either way."""
    bias: bool = False
    """Give the projection a bias. True is the ColQwen2 / ColQwen2.5 layout (colpali-engine builds its projection
    with one); False by default, the layout every reader builds: vLLM's ColQwen3 makes a bias-free projection
    whenever a config declares its dimension, and then drops a saved bias without a word (unime's directories
    declare none, so it sizes the projection from the saved tensors). A bias-free head still loads in
    colpali-engine: its directory holds a zero bias there."""

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim <= 0:
            raise ConfigError(f"multi_vector.dim: expected a positive integer, got {self.dim!r}")
        if self.tokens not in MULTI_VECTOR_TOKENS:
            raise ConfigError(f"multi_vector.tokens: expected one of {MULTI_VECTOR_TOKENS}, got {self.tokens!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"multi_vector.bias: expected true or false, got {self.bias!r}")


@dataclass
class UnimeConfig:
    """The unime part of a saved model directory (`unime_config.json`)."""

    backbone: str
    """Registry name of the backbone family (see `unime.backbones.list_backbones()`)."""
    kind: Literal["embedder", "reranker", "multi_task"] = "embedder"
    """What the directory holds: an embedder (vectors), a reranker (yes/no scores), or `multi_task`: one base
    with all three heads (pooled vector, the multi-vector head when `multi_vector` is set, the yes/no reranker;
    see `unime.multi_task`)."""
    pooling: PoolingMode = "last"
    """How token states become one vector: `last` (UniME, VLM2Vec), `mean` or `cls`."""
    normalize: bool = True
    """L2-normalise embeddings (cosine similarity becomes a dot product)."""
    prompts: PromptConfig = field(default_factory=PromptConfig)
    """Instruction templates for queries and documents."""
    rerank: RerankConfig = field(default_factory=RerankConfig)
    """Prompt and score tokens of a reranker (ignored by an embedder)."""
    matryoshka_dims: list[int] = field(default_factory=list)
    """Truncation sizes the model was trained for (matryoshka); empty when it was not."""
    similarity_fn_name: Literal["cosine", "dot"] = "cosine"
    """Similarity used by `Embedder.similarity` and written for sentence-transformers."""
    multi_vector: MultiVectorConfig | None = None
    """The multi-vector head the directory holds (`encode(..., output="multi_vector")`); None when it has none."""
    base_model: str | None = None
    """For a directory that holds a LoRA adapter only: the base model it applies to (name or path)."""
    format_version: int = FORMAT_VERSION
    """Version of this file's layout."""

    def __post_init__(self) -> None:
        if isinstance(self.prompts, dict):
            self.prompts = _from_dict(PromptConfig, self.prompts, "prompts")
        if isinstance(self.rerank, dict):
            self.rerank = _from_dict(RerankConfig, self.rerank, "rerank")
        if isinstance(self.multi_vector, dict):
            self.multi_vector = _from_dict(MultiVectorConfig, self.multi_vector, "multi_vector")
        if self.kind not in KINDS:
            raise ConfigError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"pooling: expected one of {POOLING_MODES}, got {self.pooling!r}")
        if self.similarity_fn_name not in ("cosine", "dot"):
            raise ConfigError(f"similarity_fn_name: expected 'cosine' or 'dot', got {self.similarity_fn_name!r}")
        if any(not isinstance(d, int) or d <= 0 for d in self.matryoshka_dims):
            raise ConfigError(f"matryoshka_dims: expected positive integers, got {self.matryoshka_dims!r}")
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} is newer than this unime understands ({FORMAT_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CONFIG_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UnimeConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        try:
            return _from_dict(cls, data, "")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build a dataclass from a dict, naming unknown and missing fields instead of a bare TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown field(s) {', '.join(where + k for k in unknown)}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from err
