"""`unime generate IMAGE_DIR OUT_DIR --backend vllm|openai [--mode tasks|pages] [--engine ray] ...`: the MLLM
generator's command line."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

from tyro.conf import Positional

from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset, print_summary
from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig
from unime.data_synth.mllm.ray_generation import GenerationWorker, RayBackend
from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig
from unime.ray_engine import EngineSettings, ray_cluster


@dataclass(kw_only=True)
class GenerateSettings(GenerateConfig, EngineSettings):
    """Generate training data from photos (or, with `--mode pages`, from images of document pages) with an MLLM:
    the generator's settings, the backend, and that backend's section (`openai.*` or `vllm.*`). With `--engine ray`
    the requests go to an actor pool on a Ray cluster (`--ray.address`; default: a local one), each actor with its
    own backend (a vLLM engine, or an API client)."""

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
    if settings.on_ray:
        worker = GenerationWorker(settings.backend, settings.openai, settings.vllm, settings.seed)
        backend = RayBackend(worker, settings.ray)
    elif settings.backend == "openai":
        backend = OpenAIBackend(settings.openai)
    else:
        backend = VllmBackend(settings.vllm, work_dir=settings.out_dir, seed=settings.seed)
    with ray_cluster(settings.ray) if settings.on_ray else nullcontext():
        manifest = generate_dataset(config, backend, backend_kind=settings.backend)
    print_summary(manifest, settings.out_dir)
    return 0
