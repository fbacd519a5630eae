"""`unime generate IMAGE_DIR OUT_DIR --backend vllm|openai [--mode tasks|pages] ...`: the MLLM generator's command
line."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from tyro.conf import Positional

from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset, print_summary
from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig
from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(GenerateConfig):
    """Generate training data from photos (or, with `--mode pages`, from images of document pages) with an MLLM:
    the generator's settings, the backend, and that backend's section (`openai.*` or `vllm.*`)."""

    image_dir: Positional[str]
    """Folder of photos (searched recursively)."""
    out_dir: Positional[str]
    """Output folder: shard-*.jsonl, manifest.json, views/ (resumed if present)."""
    backend: Literal["vllm", "openai"]
    """Where the MLLM runs: vLLM engines on this machine, or an OpenAI-compatible API."""
    openai: OpenAIBackendConfig = field(default_factory=OpenAIBackendConfig)
    """The OpenAI-compatible backend (with `backend: openai`)."""
    vllm: VllmBackendConfig = field(default_factory=VllmBackendConfig)
    """The vLLM backend (with `backend: vllm`); its engines are seeded from `seed`."""


def run_generate(settings: GenerateSettings) -> int:
    config = GenerateConfig(**{item.name: getattr(settings, item.name) for item in dataclasses.fields(GenerateConfig)})
    if settings.backend == "openai":
        backend = OpenAIBackend(settings.openai)
    else:
        backend = VllmBackend(settings.vllm, work_dir=settings.out_dir, seed=settings.seed)
    manifest = generate_dataset(config, backend, backend_kind=settings.backend)
    print_summary(manifest, settings.out_dir)
    return 0
