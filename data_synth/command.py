"""`unime synth KIND OUT_DIR`: write synthetic training data (drawn scenes, paraphrase pairs, task suites, pages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tyro.conf import Positional

from unime.data_synth.pages import BlockKind, run_synth_pages
from unime.data_synth.pairs import write_image_caption_pairs
from unime.data_synth.tasks import run_synth_tasks
from unime.data_synth.text_pairs import write_text_pairs
from unime.errors import ConfigError


@dataclass
class SynthSettings:
    """Generate synthetic training data."""

    kind: Positional[Literal["shapes", "text", "tasks", "pages"]]
    """shapes: drawn scenes, captions, one-attribute hard negatives; text: paraphrase pairs (stage 1); tasks:
    classification/VQA/retrieval/grounding over seven modality pairs, sharded JSONL + manifest; pages: drawn
    document pages, one-fact queries, pages with that fact changed as negatives, plus a BEIR folder (visdoc/)."""
    out_dir: Positional[str]
    """Directory to write train.jsonl, held_out.jsonl and images/ to."""
    train: int | None = None
    """Training rows (default: shapes 60, text 400; pages: training pages, 200)."""
    held_out: int | None = None
    """Held-out rows, no scene shared with training (default: shapes 30, text 100; pages: held-out pages, 50)."""
    max_shapes: int | None = None
    """Shapes per scene (default: shapes 1, where 90 scenes exist, 2: 3330; tasks 3; not for pages)."""
    negatives: int = 3
    """Hard negatives per row (pages: at most 10)."""
    seed: int = 0
    """Seed of the generator."""
    shard: str | None = None
    """tasks only: `i/N`, write only the examples this shard owns (0-based i)."""
    page_kinds: list[BlockKind] | None = None
    """pages only: the block kinds a page draws from (default: table, bar_chart, line_chart, form; `status` is a
    coloured status stamp, a fact a model too small to read the pages' text still sees)."""
    ask: list[BlockKind] | None = None
    """pages only: the block kinds the queries ask about (default: any block of the page)."""


def run_synth(settings: SynthSettings) -> int:
    sizes = {
        key: value for key, value in (("train", settings.train), ("held_out", settings.held_out)) if value is not None
    }
    if settings.kind == "tasks":
        return run_synth_tasks(
            settings.out_dir,
            settings.shard,
            negatives=settings.negatives,
            seed=settings.seed,
            max_shapes=settings.max_shapes,
            **sizes,
        )
    if settings.shard:
        raise ConfigError("--shard applies to `unime synth tasks` only")
    if settings.kind != "pages" and (settings.page_kinds is not None or settings.ask is not None):
        raise ConfigError("--page-kinds and --ask apply to `unime synth pages` only")
    if settings.kind == "pages":
        if settings.max_shapes is not None:
            raise ConfigError("--max-shapes does not apply to `unime synth pages` (pages have no shapes)")
        blocks = {"kinds": settings.page_kinds} if settings.page_kinds is not None else {}
        return run_synth_pages(
            settings.out_dir, negatives=settings.negatives, seed=settings.seed, ask=settings.ask, **blocks, **sizes
        )
    if settings.kind == "text":
        paths = write_text_pairs(settings.out_dir, seed=settings.seed, **sizes)
    else:
        paths = write_image_caption_pairs(
            settings.out_dir,
            negatives=settings.negatives,
            seed=settings.seed,
            max_shapes=settings.max_shapes or 1,
            **sizes,
        )
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
