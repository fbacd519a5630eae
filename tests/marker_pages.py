"""Drawn marker pages: small coloured markers on grey clutter, the query naming one marker's colour and the hard
negatives the same page with that marker in another colour. The answer sits in one small region of the page, which
is where late interaction should beat a single pooled vector."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

MARKERS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (235, 220, 30),
    "purple": (150, 40, 180),
    "orange": (245, 140, 20),
    "cyan": (30, 200, 210),
    "pink": (245, 120, 190),
}
"""The colour of the one small marker on a page, named by the query."""
CELL = 28
"""One cell per language-model token of the tiny Qwen2-VL (14-pixel patches, merged 2x2)."""
GRID = 4
"""Cells per side: a page is 4x4 cells, and each marker fills one of them."""
MARKS = 3
"""Markers per page, each of another colour; a query asks for one of them."""
NEGATIVES = 3
"""Hard negatives per query: the same page with the marker in another colour."""


def _page(marks: dict[int, str], background: list[tuple[int, int, int]]) -> Image.Image:
    """A page of grey clutter cells, with markers (cell -> colour name), each a small region of the page."""
    image = Image.new("RGB", (GRID * CELL, GRID * CELL))
    for index, shade in enumerate(background):
        fill = MARKERS[marks[index]] if index in marks else shade
        image.paste(
            fill, (index % GRID * CELL, index // GRID * CELL, (index % GRID + 1) * CELL, (index // GRID + 1) * CELL)
        )
    return image


def write_marker_pages(directory: Path, split: str, pages: int, seed: int) -> Path:
    """Rows of `pages` drawn pages: query = the marker's colour, negatives = the page with other marker colours."""
    rng = random.Random(f"{split}:{seed}")
    images = directory / split
    images.mkdir(parents=True)
    rows = []
    for page in range(pages):
        background = [tuple(rng.randint(60, 200) for _ in range(1)) * 3 for _ in range(GRID * GRID)]
        cells = rng.sample(range(GRID * GRID), MARKS)
        colours = rng.sample(sorted(MARKERS), MARKS + NEGATIVES)
        page_colours, others = colours[:MARKS], colours[MARKS:]
        names = []
        for index, name in enumerate([page_colours[0], *others]):
            path = images / f"{page:03d}-{index}.png"
            _page(dict(zip(cells, [name, *page_colours[1:]], strict=True)), background).save(path)
            names.append(str(path))
        colour = page_colours[0]
        rows.append(
            {
                "query": {"text": colour},
                "positive": {"image": names[0]},
                "negatives": [{"image": name} for name in names[1:]],
            }
        )
    path = directory / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
