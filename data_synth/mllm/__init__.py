"""The MLLM generator: training data from real photos in one generation pass per photo, in the style of mmE5.

- `generate.generate_dataset(GenerateConfig, backend)`: the pipeline (resume, sharding, near-duplicates,
  rejection reasons, sharded JSONL plus manifest through `unime.data_synth.manifest`).
- Backends: `vllm_backend.VllmBackend` (local model, offline, batched, data-parallel engines in child
  processes) and `openai_backend.OpenAIBackend` (any OpenAI-compatible endpoint: async, bounded concurrency,
  retries with backoff, timeouts).
- `prompting` (versioned prompt files in `prompts/`), `plan` (tasks, modality combinations, languages),
  `answer` (the JSON schema and the checks of each answer), `rows` (answer -> training row), `images`.

`GenerateConfig.mode="pages"` asks instead, for each image of a document page, for queries that find the page
(ColPali / mmE5 VisDoc), each a row: text query -> page image.

`ray_generation.RayBackend` runs the requests of a run on a Ray cluster (`--engine ray`): an actor pool, each
actor with its own backend (a vLLM engine or an API client), the writing here as for a local run.

Command line: `unime generate IMAGE_DIR OUT_DIR --backend vllm|openai [--mode pages] [--engine ray] ...`.
"""

from __future__ import annotations

from unime.data_synth.mllm.answer import (
    Answer,
    PageAnswer,
    Rejected,
    answer_schema,
    page_answer_schema,
    parse_answer,
    parse_page_answer,
)
from unime.data_synth.mllm.generate import GenerateConfig, generate_dataset
from unime.data_synth.mllm.openai_backend import OpenAIBackend, OpenAIBackendConfig
from unime.data_synth.mllm.plan import COMBINATIONS, TASKS, PlanChoices
from unime.data_synth.mllm.prompting import PAGES_PROMPT_VERSION, PROMPT_VERSION, load_prompt
from unime.data_synth.mllm.vllm_backend import VllmBackend, VllmBackendConfig

__all__ = [
    "COMBINATIONS",
    "PROMPT_VERSION",
    "TASKS",
    "Answer",
    "GenerateConfig",
    "OpenAIBackend",
    "OpenAIBackendConfig",
    "PAGES_PROMPT_VERSION",
    "PageAnswer",
    "PlanChoices",
    "Rejected",
    "VllmBackend",
    "VllmBackendConfig",
    "answer_schema",
    "generate_dataset",
    "page_answer_schema",
    "load_prompt",
    "parse_answer",
    "parse_page_answer",
]
