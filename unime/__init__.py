"""unime: turn a multimodal LLM into a universal multimodal embedder and reranker."""

from __future__ import annotations

from unime.backbones import BackboneSpec, get_backbone, list_backbones, register
from unime.config import PromptConfig, UnimeConfig
from unime.embedder import Embedder
from unime.errors import ConfigError, InvalidInputError, ModelLoadError, UnimeError
from unime.loading import load
from unime.multi_vector import MultiVectorConfig, add_multi_vector_head
from unime.reranker import Reranker
from unime.tiny import build_tiny, save_tiny

__version__ = "0.1.0"

__all__ = [
    "BackboneSpec",
    "ConfigError",
    "Embedder",
    "InvalidInputError",
    "ModelLoadError",
    "MultiVectorConfig",
    "PromptConfig",
    "Reranker",
    "UnimeConfig",
    "UnimeError",
    "add_multi_vector_head",
    "build_tiny",
    "get_backbone",
    "list_backbones",
    "load",
    "register",
    "save_tiny",
]
