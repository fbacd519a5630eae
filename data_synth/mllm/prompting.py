"""The generation prompt: a versioned text file, rendered per image into one chat request.

Prompts live in `prompts/<version>.txt` beside this module and are installed as package data. The version
string goes into the manifest, so a data set always names the prompt that produced it, and a run that resumes
a folder with another prompt version is refused (`ShardedJsonlWriter` checks it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from unime.data_synth.mllm.plan import Plan, PlanChoices
from unime.errors import ConfigError

PROMPT_VERSION = "mme5_v1"
"""The default prompt file (`prompts/mme5_v1.txt`)."""
PAGES_PROMPT_VERSION = "visdoc_queries_v1"
"""The default prompt file of the pages mode (`prompts/visdoc_queries_v1.txt`)."""
TASK_PLACEHOLDERS = ("task", "combination", "language", "tasks", "combinations", "languages")
"""What a prompt of the tasks mode may use."""
PAGE_PLACEHOLDERS = ("language", "languages", "queries_per_page")
"""What a prompt of the pages mode may use."""


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt file and the version recorded with the data it produces."""

    version: str
    """`<file stem>@<first 12 hex digits of the file's sha256>`: an edited file gets a new version."""
    text: str
    """The template, with the placeholders of its mode (`TASK_PLACEHOLDERS` or `PAGE_PLACEHOLDERS`)."""

    def render(self, plan: Plan, choices: PlanChoices) -> str:
        """The tasks mode's request text."""
        values = {
            "task": plan.task,
            "combination": plan.combination,
            "language": plan.language,
            "tasks": ", ".join(choices.tasks),
            "combinations": ", ".join(choices.combinations),
            "languages": ", ".join(choices.languages),
        }
        return string.Template(self.text).substitute(values)

    def render_pages(self, language: str, choices: PlanChoices, queries_per_page: int) -> str:
        """The pages mode's request text."""
        values = {"language": language, "languages": ", ".join(choices.languages)}
        return string.Template(self.text).substitute(values, queries_per_page=queries_per_page)


def load_prompt(
    name_or_path: str = PROMPT_VERSION, placeholders: tuple[str, ...] = TASK_PLACEHOLDERS
) -> PromptTemplate:
    """A packaged prompt by name (`"mme5_v1"`) or a prompt file by path; it may use `placeholders` only."""
    path = Path(name_or_path)
    if path.suffix == ".txt" or path.is_file():
        if not path.is_file():
            raise ConfigError(f"prompt file {str(path)!r} does not exist")
        text, stem = path.read_text(encoding="utf-8"), path.stem
    else:
        packaged = resources.files("unime.data_synth.mllm") / "prompts" / f"{name_or_path}.txt"
        if not packaged.is_file():
            available = sorted(p.name[:-4] for p in packaged.parent.iterdir() if p.name.endswith(".txt"))
            raise ConfigError(f"unknown prompt {name_or_path!r}; packaged prompts: {available}")
        text, stem = packaged.read_text(encoding="utf-8"), name_or_path
    _check_placeholders(text, stem, placeholders)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return PromptTemplate(version=f"{stem}@{digest}", text=text)


def _check_placeholders(text: str, where: str, placeholders: tuple[str, ...]) -> None:
    try:
        string.Template(text).substitute(dict.fromkeys(placeholders, ""))
    except (KeyError, ValueError) as err:
        names = ", ".join(f"${name}" for name in placeholders)
        raise ConfigError(
            f"prompt {where!r}: unknown or malformed placeholder ({err}); use {names}, and $$ for a literal $"
        ) from err


def image_data_url(image: Image.Image, *, max_side: int = 1024) -> str:
    """The image as a `data:image/jpeg;base64,...` URL, downscaled so that its longer side is <= max_side."""
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(prompt_text: str, image_url: str) -> list[dict[str, Any]]:
    """One user turn in the chat-completions format (image first, then the instructions): both backends take
    it as is (vLLM's `LLM.chat` and any OpenAI-compatible endpoint)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": prompt_text},
            ],
        }
    ]
