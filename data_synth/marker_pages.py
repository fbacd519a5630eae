"""Drawn marker pages: small two-colour markers on grey clutter, the query naming one marker's two colours (left
half, right half), and hard negatives that keep the page's colours where a pooled vector cannot tell them apart.

Each marker fills one cell, and a cell is one language-model token of the tiny Qwen2-VL: a marker's two colours
meet in one token only. The hard negatives of a query about marker (A, B), the other markers being (C, D), ...:
- `recoloured`: A replaced by a colour the page does not hold (the page's colours change);
- `flipped`: the marker drawn (B, A) (the same colours, each in the other half);
- `swapped`: B traded with another marker's right half, (A, D) and (C, B): the same colours, each in the same
  half as on the positive page; only which two colours share a cell differs.
A vector pooled over the page that holds which colours it shows, and in which half of a marker, separates the
recoloured page and the flipped one, not the swapped one; a token vector of the marker's cell separates all three.
"""

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
"""The colours of the markers' halves, named by the query."""
CELL = 28
"""One cell per language-model token of the tiny Qwen2-VL (14-pixel patches, merged 2x2)."""
GRID = 4
"""Cells per side: a page is 4x4 cells, and each marker fills one of them."""
MARKS = 3
"""Markers per page, six different colours in all; a query asks for one marker."""
NEGATIVES = ("recoloured", "flipped", "swapped")
"""The hard negatives of each query, in this order (see the module's docstring)."""

Marker = tuple[str, str]
"""A marker's colours: (left half, right half)."""


def _page(marks: dict[int, Marker], background: list[tuple[int, int, int]]) -> Image.Image:
    """A page of grey clutter cells, with two-colour markers (cell -> colours), each a small region of the page."""
    image = Image.new("RGB", (GRID * CELL, GRID * CELL))
    for index, shade in enumerate(background):
        left, top = index % GRID * CELL, index // GRID * CELL
        halves = (MARKERS[marks[index][0]], MARKERS[marks[index][1]]) if index in marks else (shade, shade)
        image.paste(halves[0], (left, top, left + CELL // 2, top + CELL))
        image.paste(halves[1], (left + CELL // 2, top, left + CELL, top + CELL))
    return image


def negative_markers(markers: list[Marker], spare: str) -> dict[str, list[Marker]]:
    """The markers of each hard negative of a query about `markers[0]` (`spare`: a colour not on the page)."""
    (a, b), (c, d) = markers[0], markers[1]
    return {
        "recoloured": [(spare, b), *markers[1:]],
        "flipped": [(b, a), *markers[1:]],
        "swapped": [(a, d), (c, b), *markers[2:]],
    }


def write_marker_pages(directory: Path, split: str, pages: int, seed: int) -> Path:
    """Rows of `pages` drawn pages: query = the asked marker's two colours, negatives as `NEGATIVES` lists them."""
    rng = random.Random(f"{split}:{seed}")
    images = directory / split
    images.mkdir(parents=True)
    rows = []
    for page in range(pages):
        background = [tuple(rng.randint(60, 200) for _ in range(1)) * 3 for _ in range(GRID * GRID)]
        cells = rng.sample(range(GRID * GRID), MARKS)
        colours = rng.sample(sorted(MARKERS), 2 * MARKS + 1)
        markers = [(colours[2 * i], colours[2 * i + 1]) for i in range(MARKS)]
        negatives = negative_markers(markers, spare=colours[-1])
        drawn = [markers, *(negatives[kind] for kind in NEGATIVES)]  # NEGATIVES' order: rows name no kinds
        names = []
        for index, marks in enumerate(drawn):
            path = images / f"{page:03d}-{index}.png"
            _page(dict(zip(cells, marks, strict=True)), background).save(path)
            names.append(str(path))
        rows.append(
            {
                "query": {"text": f"{markers[0][0]} and {markers[0][1]}"},
                "positive": {"image": names[0]},
                "negatives": [{"image": name} for name in names[1:]],
            }
        )
    path = directory / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
