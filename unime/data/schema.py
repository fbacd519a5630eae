"""The training example: named sides, never positional (DESIGN.md, contract 4).

One row of a training file (JSONL or parquet):

    {
      "query":     {"text": "...", "image": "relative/path.jpg", "instruction": "..."},  # text and/or image
      "positive":  {"text": "...", "image": "...", "instruction": "..."},
      "negatives": [{"text": "...", "image": "..."}, ...],        # optional: mined hard negatives
      "scores":    [s_pos, s_neg_1, ...],                         # optional: teacher/judge scores, positive first
      "source":    "MSCOCO_i2t"                                   # optional: dataset name (default "default")
    }

Each side is an `unime.inputs.Input` (the one input record): it needs a `text` or an `image` (or both);
`instruction` is optional and goes into the prompt as the system message. Image paths are relative to the
configured image root (absolute paths are kept).
"""

from __future__ import annotations

from dataclasses import dataclass

from unime.inputs import Input

SIDE_KEYS = frozenset({"text", "image", "instruction"})
ROW_KEYS = frozenset({"query", "positive", "negatives", "scores", "source"})
DEFAULT_SOURCE = "default"


@dataclass(frozen=True)
class TrainExample:
    """A validated training row, with where it came from (for error messages)."""

    query: Input
    positive: Input
    negatives: tuple[Input, ...] = ()
    scores: tuple[float, ...] | None = None
    """Teacher/judge scores of [positive, *negatives], in that order."""
    source: str = DEFAULT_SOURCE
    origin: str = ""
    """`file:row` of the row, to name it in errors."""
