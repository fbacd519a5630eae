"""What a benchmark asks an encoder to embed: an item (a text, an image file, or both) in a role.

An item is an `unime.inputs.Input`, the one input record, with its image as a file path and its `role` set when
the benchmark knows which side of a pair it is. Inputs are value objects: two rows that list the same caption or
the same image file give equal items, so a benchmark embeds each distinct item once (MMEB repeats candidates
heavily). `unime.eval.embedding.item_key` identifies an item by its content (the text and the image file's bytes),
which keys the embedding cache on disk.
"""

from __future__ import annotations

import re

IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>\s*")
"""Phi-3.5-V's image placeholder, which MMEB texts carry (`<|image_1|>\\nRepresent the given image.`): the
prompt template inserts the backbone's own, so it is removed."""


def clean_text(text: str | None) -> str | None:
    """A benchmark text without image placeholders and surrounding blanks; None when nothing is left."""
    if text is None:
        return None
    text = IMAGE_PLACEHOLDER.sub("", text).strip()
    return text or None
