"""Document pages drawn with PIL, queries about one fact of a page, and hard-negative pages (`unime synth pages`).

The visual-document counterpart of the drawn scenes: no model and no download, yet pages whose content a small
structured record pins down exactly. A page (`Page`) has a heading, a paragraph and two blocks, each a table, a
bar chart, a line chart or a form, or where asked (`PagesSynthConfig.kinds`) a status stamp: a badge in its
status's colour, a fact that a model too small to read text still sees. The blocks' values (table cells, bar and
point values, form fields, the status) are the page's facts (`Page.facts`). A query asks about ONE fact in
natural language and names its value ("Find the form where the City is Lisbon."), so that exactly one of the page
and its hard negatives answers it: each hard negative is the same page (same layout seed, blocks, labels and
captions) with that one value changed, redrawn.

Reproducible: page `i` is drawn from its own generator seeded by (seed, i), and that seed is the page's layout seed,
so the output depends on the seed alone and the same seed gives byte-identical images and rows. Splits share no
page: every page drawn by the run (positives and negatives) is kept distinct by `scenes.DistinctScenes`, and
layout seeds are per index, so held-out pages share neither a page nor a layout seed with training.

Output of `write_pages(OUT)`:
- `OUT/train/`, `OUT/held_out/`: training rows (`unime.data.schema`: text query, positive = the page image,
  negatives = the altered pages; source "Synthetic-VisDoc") in sharded JSONL with a manifest
  (`manifest.ShardedJsonlWriter`, resumable), images in `images/` named by content, and `facts.jsonl`: per query
  its key, text, the asked fact and answer, and the structured records of the page and of its negatives;
- `OUT/visdoc/`: the held-out split in the BEIR layout that `unime eval run --visdoc` reads (`corpus.jsonl`:
  every page, positives and negatives; `queries.jsonl`; `qrels.jsonl`: each query's one relevant page).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont

from unime.atomic import atomic_write, write_jsonl_atomic
from unime.data_synth.manifest import Manifest, ShardedJsonlWriter, make_output_directory
from unime.data_synth.scenes import COLORS, DistinctScenes
from unime.errors import ConfigError

BlockKind = Literal["table", "bar_chart", "line_chart", "form", "status"]
BLOCK_KINDS: tuple[BlockKind, ...] = ("table", "bar_chart", "line_chart", "form")
"""The kinds a page draws its blocks from by default: facts written as text (cells, labels, field values)."""
VISIBLE_KINDS: tuple[BlockKind, ...] = ("status",)
"""Kinds whose fact is a colour as well as a word, which a model too small to read the page's text can see."""
SOURCE = "Synthetic-VisDoc"
PROMPT_VERSION = "pages-v1"
"""Bump when vocabularies, templates or drawing change what a seed produces."""
QUERY_INSTRUCTION = "Find the document page that answers the query."
MAX_NEGATIVES = 10
"""The smallest value vocabulary (a form's City) has 12 entries: at most 11 other values, 10 keeps a margin."""

COMPANIES = ("Northwind", "Blue Harbor", "Crestline", "Oakridge", "Silver Fern", "Redwood", "Lumen", "Greyfield")
COMPANIES += ("Atlas Works", "Brightwater", "Kestrel", "Meridian")
REPORTS = ("Annual report", "Quarterly review", "Budget summary", "Operations update", "Field survey", "Board brief")
MEASURES = ("sales", "revenue", "costs", "orders", "visitors", "returns", "output", "energy use")
REGIONS = ("North", "South", "East", "West", "Central", "Coastal")
PRODUCTS = ("Apples", "Pears", "Plums", "Grapes", "Lemons", "Cherries", "Melons", "Figs")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
FORM_KINDS = ("Travel claim", "Membership", "Delivery order", "Visitor pass", "Purchase request", "Repair ticket")
FORM_FIELDS = ("Name", "Date", "Amount", "Reference", "City")
FIRST_NAMES = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jonas")
LAST_NAMES = ("Novak", "Silva", "Okafor", "Larsen", "Moreau", "Tanaka", "Weber", "Costa", "Haddad", "Quinn")
CITIES = ("Lisbon", "Oslo", "Lyon", "Porto", "Graz", "Turin", "Ghent", "Malmo", "Bergen", "Leeds", "Cork", "Basel")
STATUSES: dict[str, tuple[int, int, int]] = {
    "approved": (40, 170, 60),
    "rejected": (220, 40, 40),
    "pending": (235, 210, 40),
    "confirmed": (40, 80, 220),
    "urgent": (245, 140, 30),
    "on hold": (140, 60, 180),
    "draft": (130, 130, 130),
    "paid": (30, 190, 200),
    "overdue": (245, 120, 190),
    "void": (20, 20, 20),
}
STATUS_COLORS: dict[str, str] = {
    "approved": "green",
    "rejected": "red",
    "pending": "yellow",
    "confirmed": "blue",
    "urgent": "orange",
    "on hold": "purple",
    "draft": "grey",
    "paid": "cyan",
    "overdue": "pink",
    "void": "black",
}
"""The name of each status's colour, which the queries say with the status, as people describe a stamp."""
"""A status stamp's word and its colour: one colour per status, as offices colour-code them, so that the stamp's
fact is seen in its colour before its word is read."""
FACT_COUNTS: dict[BlockKind, int] = {"table": 9, "bar_chart": 4, "line_chart": 5, "form": 4, "status": 1}
"""Facts (values) in a block of each kind."""
STAMPED = ("invoice", "claim", "order", "contract", "request")
SENTENCES = (
    "This {report} of {company} sums up the {measure} of the period.",
    "Figures are rounded and were checked by the finance team.",
    "{company} expects its {measure} to stay close to plan next year.",
    "The tables below break the results down by region and product.",
    "Questions about this page go to the {company} planning office.",
    "Numbers marked as estimates may change in the final release.",
)

# One fact, asked in natural language and naming its value: only the page that holds the value answers it.
TEMPLATES: dict[BlockKind, tuple[str, ...]] = {
    "table": (
        "Which page reports {value} for {row} in {column} in the {caption} table?",
        "Find the {caption} table where {row} has {value} in {column}.",
        "In which report is the {caption} of {row} in {column} equal to {value}?",
    ),
    "bar_chart": (
        "Which bar chart shows {label} at {value}?",
        "Find the chart of {caption} where the {label} bar reaches {value}.",
        "Which page has a {caption} chart with {value} for {label}?",
    ),
    "line_chart": (
        "Find the line chart of {caption} with a value of {value} in {label}.",
        "Which page's {caption} chart reads {value} for {label}?",
        "In which report does the {caption} line reach {value} in {label}?",
    ),
    "form": (
        "Find the form where the {label} is {value}.",
        "Which {caption} form lists {value} as the {label}?",
        "Which page shows a {caption} form with {label} {value}?",
    ),
    "status": (
        "Find the {caption} with the {color} {value} stamp.",
        "Which page carries a {color} stamp reading {value}?",
        "Which {caption} is marked {value} in {color}?",
    ),
}


@dataclass(frozen=True)
class Block:
    """One block of a page: a table, a bar chart, a line chart or a form; its `values` are the page's facts."""

    kind: BlockKind
    caption: str
    labels: tuple[str, ...]
    """table: row labels; charts: one label per bar or point; form: field names; status: ("Status",)."""
    values: tuple[str, ...]
    """Row-major for a table (len(labels) * len(columns) cells), else one per label."""
    columns: tuple[str, ...] = ()
    """table only: column labels."""
    color: str = "blue"
    """charts only: the colour of bars and lines (a layout choice, never a fact)."""

    def fact_names(self) -> list[str]:
        """The name of each value, in order: "North/2021" for a table cell, else the label."""
        if self.kind == "table":
            return [f"{row}/{column}" for row in self.labels for column in self.columns]
        return list(self.labels)


@dataclass(frozen=True)
class Page:
    """A document page as a structured record: everything that decides its image."""

    layout_seed: str
    """The seed the page was drawn from; a hard negative keeps its positive's."""
    title: str
    paragraph: str
    blocks: tuple[Block, ...]

    def facts(self) -> dict[str, str]:
        """Every fact of the page, by name: "<block index>/<fact name>" (e.g. "0/North/2021", "1/City")."""
        return {
            f"{index}/{name}": value
            for index, block in enumerate(self.blocks)
            for name, value in zip(block.fact_names(), block.values, strict=True)
        }

    def with_fact(self, fact: str, value: str) -> Page:
        """The same page with fact `fact` set to `value`, nothing else changed."""
        index, _, name = fact.partition("/")
        block = self.blocks[int(index)]
        position = block.fact_names().index(name)
        values = block.values[:position] + (value,) + block.values[position + 1 :]
        blocks = self.blocks[: int(index)] + (replace(block, values=values),) + self.blocks[int(index) + 1 :]
        return replace(self, blocks=blocks)

    def key(self) -> tuple:
        """Identity of the page's content, layout seed aside: equal keys draw equal pages."""
        return (self.title, self.paragraph, tuple(tuple(sorted(asdict(b).items())) for b in self.blocks))

    def record(self) -> dict:
        """The JSON form of the record (`facts.jsonl`)."""
        return asdict(self)

    def file_name(self) -> str:
        """Named by content (layout seed included): equal pages share one file."""
        digest = hashlib.sha1(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:20]
        return f"images/{digest}.png"


# ------------------------------------------------------------------------------------------------------------
# Drawing a page's record at random
# ------------------------------------------------------------------------------------------------------------


def _form_value(field_name: str, rng: random.Random) -> str:
    if field_name == "Name":
        return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    if field_name == "Date":
        return f"{rng.randint(1, 28):02d} {rng.choice(MONTHS)} {rng.randint(2019, 2025)}"
    if field_name == "Amount":
        return f"${rng.randint(20, 9999):,}"
    if field_name == "Reference":
        return f"{rng.choice('ABCDEFGHJK')}{rng.choice('LMNPRSTUVW')}-{rng.randint(1000, 9999)}"
    if field_name == "City":
        return rng.choice(CITIES)
    raise ValueError(f"unknown form field {field_name!r}; expected one of {FORM_FIELDS}")


def draw_value(block: Block, position: int, rng: random.Random) -> str:
    """A random value for fact `position` of `block`, from the vocabulary that fact draws from."""
    if block.kind == "table":
        return str(rng.randint(10, 999))
    if block.kind == "form":
        return _form_value(block.labels[position], rng)
    if block.kind == "status":
        return rng.choice(sorted(STATUSES))
    return str(rng.randint(5, 95))  # charts: the axis runs 0..100


def _random_block(kind: BlockKind, measure: str, rng: random.Random) -> Block:
    if kind == "table":
        start = rng.randint(2018, 2023)
        columns = tuple(str(year) for year in range(start, start + 3))
        block = Block(kind, f"{measure} by region", tuple(rng.sample(REGIONS, 3)), (), columns)
    elif kind == "bar_chart":
        block = Block(
            kind, f"{measure} by product", tuple(rng.sample(PRODUCTS, 4)), (), color=rng.choice(sorted(COLORS))
        )
    elif kind == "line_chart":
        start = rng.randint(0, len(MONTHS) - 5)
        block = Block(kind, f"monthly {measure}", MONTHS[start : start + 5], (), color=rng.choice(sorted(COLORS)))
    elif kind == "status":
        block = Block(kind, rng.choice(STAMPED), ("Status",), ())
    else:
        chosen = set(rng.sample(FORM_FIELDS, 4))
        fields = tuple(name for name in FORM_FIELDS if name in chosen)  # in the usual order
        block = Block(kind, rng.choice(FORM_KINDS).lower(), fields, ())
    return replace(block, values=tuple(draw_value(block, position, rng) for position in range(FACT_COUNTS[kind])))


def random_page(
    rng: random.Random,
    layout_seed: str,
    kinds: Sequence[BlockKind] = BLOCK_KINDS,
    ask: Sequence[BlockKind] | None = None,
) -> Page:
    """A page: a heading, a paragraph of 2-3 sentences and two blocks of different kinds (from `kinds`) and
    measures; with `ask`, one of the two blocks is of an asked kind, at either place."""
    company, report = rng.choice(COMPANIES), rng.choice(REPORTS)
    measures = rng.sample(MEASURES, 3)
    sentences = [s.format(company=company, report=report.lower(), measure=measures[2]) for s in SENTENCES]
    paragraph = " ".join(rng.sample(sentences, rng.randint(2, 3)))
    if ask is None:
        kinds = rng.sample(tuple(kinds), 2)
    else:
        asked = rng.choice(tuple(ask))
        kinds = rng.sample([asked, rng.choice([k for k in kinds if k != asked])], 2)
    blocks = tuple(_random_block(kind, measure, rng) for kind, measure in zip(kinds, measures, strict=False))
    return Page(layout_seed, f"{company} {report} {rng.randint(2019, 2025)}", paragraph, blocks)


def query_text(page: Page, fact: str, rng: random.Random) -> str:
    """A natural-language query about fact `fact` of `page`, naming its value."""
    index, _, name = fact.partition("/")
    block = page.blocks[int(index)]
    row, _, column = name.partition("/")
    template = rng.choice(TEMPLATES[block.kind])
    value = page.facts()[fact]
    color = STATUS_COLORS.get(value, "") if block.kind == "status" else ""
    return template.format(value=value, caption=block.caption, label=name, row=row, column=column or row, color=color)


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------

BLACK, GREY, LIGHT = (20, 20, 20), (120, 120, 120), (228, 228, 232)
Box = tuple[float, float, float, float]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font (as the drawn scenes use): the same glyphs on every machine, no system font lookup.
    return ImageFont.load_default(size=size)


def _centered(canvas: ImageDraw.ImageDraw, x: float, y: float, text: str, size: int, fill=BLACK) -> None:
    font = _font(size)
    canvas.text((x - canvas.textlength(text, font=font) / 2, y), text, font=font, fill=fill)


def _wrap(canvas: ImageDraw.ImageDraw, text: str, size: int, width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and canvas.textlength(f"{lines[-1]} {word}", font=_font(size)) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _draw_table(canvas: ImageDraw.ImageDraw, block: Block, box: Box, unit: int) -> None:
    x0, y0, x1, y1 = box
    canvas.text((x0, y0), block.caption.capitalize(), font=_font(unit), fill=BLACK)
    top = y0 + unit * 1.6
    columns = len(block.columns) + 1
    cell_width = (x1 - x0) / columns
    row_height = min(unit * 1.8, (y1 - top) / (len(block.labels) + 1))
    header = ("", *block.columns)
    cells = [header] + [
        (label, *block.values[r * len(block.columns) : (r + 1) * len(block.columns)])
        for r, label in enumerate(block.labels)
    ]
    for r, row in enumerate(cells):
        for c, text in enumerate(row):
            left, upper = x0 + c * cell_width, top + r * row_height
            fill = LIGHT if r == 0 or c == 0 else None
            canvas.rectangle((left, upper, left + cell_width, upper + row_height), fill=fill, outline=GREY)
            canvas.text((left + unit * 0.3, upper + (row_height - unit) / 2), text, font=_font(unit), fill=BLACK)


def _plot_area(canvas: ImageDraw.ImageDraw, block: Block, box: Box, unit: int) -> tuple[Box, float]:
    """Caption and axes of a chart; returns the plot box (0..100 from bottom to top) and one label slot's width."""
    x0, y0, x1, y1 = box
    _centered(canvas, (x0 + x1) / 2, y0, block.caption.capitalize(), unit)
    plot = (x0 + unit * 0.5, y0 + unit * 2.8, x1, y1 - unit * 1.6)
    canvas.line((plot[0], plot[1], plot[0], plot[3], plot[2], plot[3]), fill=GREY, width=1)
    slot = (plot[2] - plot[0]) / len(block.labels)
    for i, label in enumerate(block.labels):
        _centered(canvas, plot[0] + slot * (i + 0.5), plot[3] + unit * 0.3, label, unit, fill=GREY)
    return plot, slot


def _value_y(plot: Box, value: str) -> float:
    return plot[3] - (plot[3] - plot[1]) * int(value) / 100


def _draw_bar_chart(canvas: ImageDraw.ImageDraw, block: Block, box: Box, unit: int) -> None:
    plot, slot = _plot_area(canvas, block, box, unit)
    for i, value in enumerate(block.values):
        center, top = plot[0] + slot * (i + 0.5), _value_y(plot, value)
        canvas.rectangle((center - slot * 0.3, top, center + slot * 0.3, plot[3]), fill=COLORS[block.color])
        _centered(canvas, center, top - unit * 1.2, value, unit)


def _draw_line_chart(canvas: ImageDraw.ImageDraw, block: Block, box: Box, unit: int) -> None:
    plot, slot = _plot_area(canvas, block, box, unit)
    points = [(plot[0] + slot * (i + 0.5), _value_y(plot, value)) for i, value in enumerate(block.values)]
    canvas.line(points, fill=COLORS[block.color], width=max(1, unit // 5))
    for (x, y), value in zip(points, block.values, strict=True):
        radius = max(1.5, unit / 5)
        canvas.ellipse((x - radius, y - radius, x + radius, y + radius), fill=COLORS[block.color])
        _centered(canvas, x, y - unit * 1.3, value, unit)


def _draw_form(canvas: ImageDraw.ImageDraw, block: Block, box: Box, unit: int) -> None:
    x0, y0, x1, y1 = box
    canvas.text((x0, y0), f"{block.caption.capitalize()} form", font=_font(unit), fill=BLACK)
    top = y0 + unit * 1.8
    row_height = min(unit * 2.0, (y1 - top) / len(block.labels))
    label_width = (x1 - x0) * 0.32
    for i, (label, value) in enumerate(zip(block.labels, block.values, strict=True)):
        upper = top + i * row_height
        canvas.text((x0, upper + row_height * 0.2), f"{label}:", font=_font(unit), fill=GREY)
        field_box = (x0 + label_width, upper + row_height * 0.1, x1, upper + row_height * 0.9)
        canvas.rectangle(field_box, outline=GREY)
        canvas.text((field_box[0] + unit * 0.4, upper + row_height * 0.2), value, font=_font(unit), fill=BLACK)


def _draw_status(canvas: ImageDraw.ImageDraw, block: Block, box: Box, unit: int) -> None:
    """A status stamp: the caption, then a badge filled with the status's colour, the status written on it."""
    x0, y0, x1, y1 = box
    canvas.text((x0, y0), f"{block.caption.capitalize()} status", font=_font(unit), fill=BLACK)
    top = y0 + unit * 1.8
    # The whole block under the caption, as a "PAID" or "VOID" stamp covers a page: big enough that a page's pooled
    # vector holds its colour. A fixed place: a hard negative changes only its fill and its word.
    badge = (x0, top, x1, y1)
    canvas.rectangle(badge, fill=STATUSES[block.values[0]], outline=BLACK, width=max(1, unit // 5))
    _centered(
        canvas,
        (badge[0] + badge[2]) / 2,
        (badge[1] + badge[3] - unit * 1.5) / 2,
        block.values[0].upper(),
        round(unit * 1.5),
        fill=(255, 255, 255),
    )


DRAWERS: dict[BlockKind, Callable[[ImageDraw.ImageDraw, Block, Box, int], None]] = {
    "table": _draw_table,
    "bar_chart": _draw_bar_chart,
    "line_chart": _draw_line_chart,
    "form": _draw_form,
    "status": _draw_status,
}


def draw_page(page: Page, width: int = 384, height: int = 512) -> Image.Image:
    """Draw `page`: the heading, up to three lines of the paragraph, then its blocks stacked in equal boxes.

    Where each block sits depends on the record's structure only, never on its values: a hard negative moves
    nothing but the value it changes (a bar's height, a cell's text).
    """
    image = Image.new("RGB", (width, height), (255, 255, 255))
    canvas = ImageDraw.Draw(image)
    # Body text size, and everything else with it, from the width, or from the height on a wide page (the text
    # and both blocks need about 0.65 x width of height at this size).
    side = min(width, height * 3 // 4)
    unit = max(7, side // 32)
    margin = round(side * 0.05)
    canvas.text((margin, margin), page.title, font=_font(round(unit * 1.5)), fill=BLACK)
    y = margin + unit * 2.6
    for line in _wrap(canvas, page.paragraph, unit, width - 2 * margin)[:3]:
        canvas.text((margin, y), line, font=_font(unit), fill=GREY)
        y += unit * 1.3
    y += unit
    gap = unit * 1.2
    block_height = (height - margin - y - gap * (len(page.blocks) - 1)) / len(page.blocks)
    for block in page.blocks:
        DRAWERS[block.kind](canvas, block, (margin, y, width - margin, y + block_height), unit)
        y += block_height + gap
    return image


# ------------------------------------------------------------------------------------------------------------
# The generation walk and its output
# ------------------------------------------------------------------------------------------------------------


@dataclass
class PagesSynthConfig:
    """Settings of the page generator (`unime synth pages`)."""

    train: int = 200
    """Training pages (each gives `queries_per_page` rows)."""
    held_out: int = 50
    """Held-out pages; no page (and no layout seed) is shared with training."""
    negatives: int = 3
    """Hard-negative pages per query, each the page with the asked fact changed (at most 10)."""
    queries_per_page: int = 1
    """Queries per page, each about a different fact."""
    kinds: list[BlockKind] = field(default_factory=lambda: list(BLOCK_KINDS))
    """Block kinds a page's two blocks are drawn from (two different ones). `status` is a coloured status stamp,
    a fact that a model too small to read the page's text still sees (`VISIBLE_KINDS`)."""
    ask: list[BlockKind] | None = None
    """Block kinds the queries ask about (each page then holds one block of these kinds); None: any block."""
    seed: int = 0
    """Seed of the generator: page i draws from (seed, i), its layout seed."""
    width: int = 384
    """Page width in pixels."""
    height: int = 512
    """Page height in pixels."""
    records_per_shard: int = 1000
    """Rows per JSONL shard file."""


@dataclass(frozen=True)
class PageQuery:
    """One generated query with its page and hard negatives (before rendering)."""

    key: str
    """Idempotent record key, e.g. "train-0000042-q0"."""
    split: str
    """"train" or "held_out"."""
    text: str
    """The query, naming the fact's value."""
    fact: str
    """The asked fact's name in `page.facts()`."""
    answer: str
    """The fact's value on the positive page (named in `text`)."""
    page: Page
    negatives: tuple[Page, ...]
    """The page with `fact` set to another value, one page per value."""

    def record(self) -> dict:
        """The line of `facts.jsonl`: the query, its fact and answer, and every page's record and image."""
        return {
            "key": self.key,
            "query": self.text,
            "fact": self.fact,
            "answer": self.answer,
            "page": {"image": self.page.file_name(), **self.page.record()},
            "negatives": [{"image": n.file_name(), **n.record()} for n in self.negatives],
        }


def _check(config: PagesSynthConfig) -> None:
    if config.train < 0 or config.held_out < 0:
        raise ConfigError(f"train and held_out must be >= 0, got {config.train} and {config.held_out}")
    if not 0 <= config.negatives <= MAX_NEGATIVES:
        raise ConfigError(f"negatives must be in 0..{MAX_NEGATIVES} for pages, got {config.negatives}")
    unknown = sorted(set(config.kinds) - set(TEMPLATES))
    if unknown or len(set(config.kinds)) < 2:
        raise ConfigError(f"kinds: expected two or more of {sorted(TEMPLATES)}, got {config.kinds}")
    if config.ask is not None and (not config.ask or not set(config.ask) <= set(config.kinds)):
        raise ConfigError(f"ask: expected one or more of kinds {config.kinds}, got {config.ask}")
    if "status" in (config.ask or config.kinds) and config.negatives > len(STATUSES) - 1:
        raise ConfigError(f"negatives must be at most {len(STATUSES) - 1} with status stamps, got {config.negatives}")
    # The fewest facts a page offers the queries: its asked block's, or both blocks' (two different kinds).
    if config.ask is not None:
        most = min(FACT_COUNTS[kind] for kind in config.ask)
    else:
        most = min(FACT_COUNTS[a] + FACT_COUNTS[b] for a in config.kinds for b in config.kinds if a != b)
    if not 1 <= config.queries_per_page <= most:
        raise ConfigError(
            f"queries_per_page must be in 1..{most} (the facts a page offers to ask), got {config.queries_per_page}"
        )
    if config.width < 128 or config.height < 160:
        # Below 160 pixels of height the heading, the paragraph and two blocks no longer fit the smallest text.
        raise ConfigError(f"pages must be at least 128 wide and 160 high, got {config.width}x{config.height}")


def _negatives(page: Page, fact: str, wanted: int, rng: random.Random, pages: DistinctScenes) -> tuple[Page, ...]:
    """`wanted` copies of `page` with `fact` redrawn to other values, each a page no earlier draw of the run gave."""
    index, _, name = fact.partition("/")
    block = page.blocks[int(index)]
    position = block.fact_names().index(name)
    answer = block.values[position]
    negatives: list[Page] = []
    while len(negatives) < wanted:
        value = draw_value(block, position, rng)
        if value == answer:
            continue
        altered = page.with_fact(fact, value)
        if pages.accept(altered.key()):  # a repeat (of a sibling or any other page) is refused and redrawn
            negatives.append(altered)
    return tuple(negatives)


def _askable(page: Page, ask: Sequence[BlockKind] | None) -> list[str]:
    """The facts of `page` that queries may ask about, sorted: those of blocks of an asked kind, or all."""
    facts = sorted(page.facts())
    return facts if ask is None else [f for f in facts if page.blocks[int(f.partition("/")[0])].kind in ask]


def plan(config: PagesSynthConfig) -> Iterator[PageQuery]:
    """The whole generation walk, in order: the training pages' queries, then the held-out pages' queries.

    Page `i` (counted across both splits) is drawn from `random.Random("unime-pages:<seed>:<i>")`, whose seed
    string is the page's layout seed: the walk depends on the seed alone.
    """
    _check(config)
    total = config.train + config.held_out
    pages = DistinctScenes(
        total * (1 + config.queries_per_page * config.negatives),
        asked=f"{config.train} + {config.held_out}",
        detail=" (pages)",
    )
    index = 0
    for split, wanted in (("train", config.train), ("held_out", config.held_out)):
        for _ in range(wanted):
            layout_seed = f"unime-pages:{config.seed}:{index}"
            rng = random.Random(layout_seed)
            page = random_page(rng, layout_seed, config.kinds, config.ask)
            while not pages.accept(page.key()):
                page = random_page(rng, layout_seed, config.kinds, config.ask)
            for q, fact in enumerate(rng.sample(_askable(page, config.ask), config.queries_per_page)):
                yield PageQuery(
                    key=f"{split}-{index:07d}-q{q}",
                    split=split,
                    text=query_text(page, fact, rng),
                    fact=fact,
                    answer=page.facts()[fact],
                    page=page,
                    negatives=_negatives(page, fact, config.negatives, rng, pages),
                )
            index += 1


def save_page(page: Page, directory: Path, width: int, height: int) -> str:
    """Draw `page` to `directory/images/<content hash>.png` (once; atomically) and return that relative path."""
    name = page.file_name()
    path = directory / name
    if not path.is_file():
        with atomic_write(path, "wb") as handle:
            draw_page(page, width, height).save(handle, format="PNG")
    return name


def to_row(query: PageQuery, directory: Path, width: int, height: int) -> dict:
    """The training row of `query` (unime.data.schema), drawing its pages under `directory/images/`."""
    return {
        "query": {"text": query.text, "instruction": QUERY_INSTRUCTION},
        "positive": {"image": save_page(query.page, directory, width, height)},
        "negatives": [{"image": save_page(n, directory, width, height)} for n in query.negatives],
        "source": SOURCE,
    }


def write_visdoc_beir(queries: Sequence[PageQuery], folder: str | Path, *, width: int, height: int) -> Path:
    """Write `queries` in the BEIR layout of visual-document retrieval (`unime eval run --visdoc FOLDER`).

    `corpus.jsonl` holds every page once (positives and hard negatives; `corpus-id` = the image's content hash,
    `image` relative to the folder), `queries.jsonl` the query texts, `qrels.jsonl` each query's one relevant
    page (score 1). Returns the folder.
    """
    folder = make_output_directory(folder)
    corpus: dict[str, str] = {}
    for query in queries:
        for page in (query.page, *query.negatives):
            name = save_page(page, folder, width, height)
            corpus.setdefault(Path(name).stem, name)
    write_jsonl_atomic(folder / "corpus.jsonl", [{"corpus-id": cid, "image": name} for cid, name in corpus.items()])
    write_jsonl_atomic(folder / "queries.jsonl", [{"query-id": q.key, "query": q.text} for q in queries])
    qrels = [{"query-id": q.key, "corpus-id": Path(q.page.file_name()).stem, "score": 1} for q in queries]
    write_jsonl_atomic(folder / "qrels.jsonl", qrels)
    return folder


@dataclass
class PagesSynthResult:
    """Where each split went, its manifest, and the BEIR folder of the held-out split."""

    directories: dict[str, Path] = field(default_factory=dict)
    manifests: dict[str, Manifest] = field(default_factory=dict)
    visdoc: Path | None = None

    def shard_paths(self, split: str) -> list[Path]:
        return [self.directories[split] / name for name in self.manifests[split].shards]


def write_pages(out_dir: str | Path, config: PagesSynthConfig | None = None) -> PagesSynthResult:
    """Generate and draw the pages, writing `OUT/train`, `OUT/held_out` (rows, images, `facts.jsonl`) and
    `OUT/visdoc` (the held-out split in the BEIR layout); resumes whatever an earlier run with the same settings
    left."""
    config = config or PagesSynthConfig()
    _check(config)
    out_dir = make_output_directory(out_dir)  # first, so that a bad path is named as given
    settings = asdict(config)
    del settings["records_per_shard"], settings["seed"]  # the seed is the manifest's own field
    result = PagesSynthResult()
    writers: dict[str, ShardedJsonlWriter] = {}
    queries: dict[str, list[PageQuery]] = {"train": [], "held_out": []}
    try:
        for split in queries:
            manifest = Manifest(prompt_version=PROMPT_VERSION, model="procedural", seed=config.seed, settings=settings)
            make_output_directory(out_dir / split / "images")
            writers[split] = ShardedJsonlWriter(
                out_dir / split, manifest=manifest, records_per_shard=config.records_per_shard
            )
            result.directories[split] = out_dir / split
        for query in plan(config):
            queries[query.split].append(query)
            writer = writers[query.split]
            if query.key not in writer:
                writer.write(query.key, to_row(query, writer.directory, config.width, config.height))
    finally:
        for split, writer in writers.items():
            asked = Counter(q.page.blocks[int(q.fact.partition("/")[0])].kind for q in queries[split])
            writer.manifest.details = {
                "generator": "pages",
                "config": asdict(config),
                "pages": len({q.page.key() for q in queries[split]}),
                "counts": {f"asked_block/{kind}": n for kind, n in sorted(asked.items())},
            }
            result.manifests[split] = writer.close()
    for split, split_queries in queries.items():
        write_jsonl_atomic(out_dir / split / "facts.jsonl", [q.record() for q in split_queries])
    if queries["held_out"]:
        result.visdoc = write_visdoc_beir(
            queries["held_out"], out_dir / "visdoc", width=config.width, height=config.height
        )
    return result


def run_synth_pages(out_dir: str | Path, **settings: Any) -> int:
    """`unime synth pages`: generate, print where each split went."""
    result = write_pages(out_dir, PagesSynthConfig(**settings))
    for split, manifest in result.manifests.items():
        where = result.directories[split]
        print(f"{split}: {where} ({manifest.kept} rows in {len(manifest.shards)} shard(s))")
    if result.visdoc is not None:
        print(f"visdoc: {result.visdoc} (unime eval run --visdoc {result.visdoc})")
    return 0
