"""What a benchmark asks an encoder to embed: an item (a text, an image file, or both) in a role.

Items are value objects: two rows that list the same caption or the same image file give equal items, so a
benchmark embeds each distinct item once (MMEB repeats candidates heavily). `unime.eval.embedding.item_key`
identifies an item by its content (the text and the image file's bytes), which keys the embedding cache on disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["query", "document"]

IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>\s*")
"""Phi-3.5-V's image placeholder, which MMEB texts carry (`<|image_1|>\\nRepresent the given image.`): the
prompt template inserts the backbone's own, so it is removed."""


@dataclass(frozen=True)
class Item:
    """One thing to embed.

    `role` says which side of a pair it is (encoders may give queries and documents their configured
    instructions); `instruction`, when set, is used instead.
    """

    text: str | None = None
    image: Path | None = None
    """An image file (an absolute or caller-relative path); read by the encoder."""
    role: Role | None = None
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.image is None:
            raise ValueError("an item needs a text, an image or both")

    def as_input(self) -> str | dict[str, object]:
        """The item as `unime`/sentence-transformers `encode` input."""
        if self.image is None:
            return {"text": self.text}
        if self.text is None:
            return {"image": self.image}
        return {"text": self.text, "image": self.image}


def clean_text(text: str | None) -> str | None:
    """A benchmark text without image placeholders and surrounding blanks; None when nothing is left."""
    if text is None:
        return None
    text = IMAGE_PLACEHOLDER.sub("", text).strip()
    return text or None
