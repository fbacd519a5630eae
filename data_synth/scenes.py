"""Scenes of simple shapes drawn with PIL, with the captions that describe them.

The procedural data of the embedded default: no model and no download, yet images whose content a caption
pins down exactly (colour, shape, position), so that retrieval can be learned and measured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from unime.errors import ConfigError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TASK_SHAPES: tuple[str, ...] = SHAPES + ("diamond", "cross")
"""Task scenes draw from more shapes, so that a question about a shape has enough wrong answers."""
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: what it is, its colour, where it sits, and (task scenes) its size and count.

    `size="medium"` and `count=1` are the defaults of the original image-caption scenes, which neither
    mention nor change them; task scenes use sizes "small"/"large" and counts 1..4 (a group of copies).
    """

    kind: str
    color: str
    position: str
    size: str = "medium"
    count: int = 1

    def describe(self) -> str:
        return f"{self.noun_phrase()} {where_phrase(self.position)}"

    def noun_phrase(self) -> str:
        """e.g. 'a red circle', 'a small orange square', 'three large blue triangles'."""
        adjectives = ([self.size] if self.size != "medium" else []) + [self.color]
        if self.count == 1:
            article = "an" if adjectives[0][0] in "aeiou" else "a"
            return f"{article} {' '.join(adjectives)} {self.kind}"
        plural = self.kind + ("es" if self.kind.endswith("s") else "s")
        return f"{NUMBER_WORDS[self.count]} {' '.join(adjectives)} {plural}"

    def appearance(self) -> tuple:
        """Everything but the position: two shapes that look alike have equal appearances."""
        return (self.kind, self.color, self.size, self.count)


def where_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"on the {position}"


NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
SIZE_SCALE = {"medium": 1.0, "small": 0.5, "large": 0.75}
"""Radius relative to the original scenes' shapes; task scenes' large shapes still never overlap a neighbour."""
# Offsets of a group's copies, in units of the group's radius; each copy has half that radius.
_GROUP_OFFSETS = {
    1: [(0.0, 0.0)],
    2: [(-0.5, 0.0), (0.5, 0.0)],
    3: [(-0.5, 0.45), (0.5, 0.45), (0.0, -0.45)],
    4: [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)],
}


def describe(shapes: list[Shape]) -> str:
    """The caption of a scene, e.g. 'a red circle on the left and a blue square on the right'."""
    return " and ".join(shape.describe() for shape in shapes)


def draw_scene(
    shapes: list[Shape],
    size: int = 112,
    background: tuple[int, int, int] = (255, 255, 255),
    text: str | None = None,
):
    """Draw the shapes on a square canvas of `size` pixels, and `text` (if any) in the top-left corner."""
    image = Image.new("RGB", (size, size), background)
    canvas = ImageDraw.Draw(image)
    for shape in shapes:
        cx, cy = (coordinate * size for coordinate in POSITIONS[shape.position])
        radius = size * 0.16 * SIZE_SCALE[shape.size]
        if shape.count == 1:
            _draw_shape(canvas, shape.kind, cx, cy, radius, COLORS[shape.color])
            continue
        for dx, dy in _GROUP_OFFSETS[shape.count]:
            _draw_shape(canvas, shape.kind, cx + dx * radius, cy + dy * radius, radius / 2, COLORS[shape.color])
    if text:
        font = ImageFont.load_default(size=max(8, size // 9))
        canvas.text((size * 0.03, size * 0.02), text, fill=(0, 0, 0), font=font)
    return image


def _draw_shape(canvas: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, radius: float, fill) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        canvas.ellipse(box, fill=fill)
    elif kind == "square":
        canvas.rectangle(box, fill=fill)
    elif kind == "triangle":
        canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    elif kind == "diamond":
        canvas.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    elif kind == "cross":
        bar = radius / 3
        canvas.rectangle((cx - radius, cy - bar, cx + radius, cy + bar), fill=fill)
        canvas.rectangle((cx - bar, cy - radius, cx + bar, cy + radius), fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {TASK_SHAPES}")


def random_scene(rng: random.Random, max_shapes: int = 2) -> list[Shape]:
    """A scene of 1..max_shapes shapes at distinct positions."""
    count = rng.randint(1, max_shapes)
    positions = rng.sample(sorted(POSITIONS), count)
    return [Shape(rng.choice(SHAPES), rng.choice(sorted(COLORS)), position) for position in positions]


ATTRIBUTES = ("color", "kind", "position")


def alter_one_attribute(shapes: list[Shape], rng: random.Random) -> list[Shape]:
    """The scene with one attribute of one shape changed (a SugarCrepe-style hard negative).

    The change keeps the scene valid: a new position is one no other shape occupies.
    """
    index = rng.randrange(len(shapes))
    shape = shapes[index]
    attribute = rng.choice(ATTRIBUTES)
    if attribute == "color":
        shape = Shape(shape.kind, rng.choice([c for c in sorted(COLORS) if c != shape.color]), shape.position)
    elif attribute == "kind":
        shape = Shape(rng.choice([k for k in SHAPES if k != shape.kind]), shape.color, shape.position)
    else:
        taken = {s.position for s in shapes}
        shape = Shape(shape.kind, shape.color, rng.choice([p for p in sorted(POSITIONS) if p not in taken]))
    return shapes[:index] + [shape] + shapes[index + 1 :]


def scene_key(shapes: list[Shape]) -> tuple:
    """Identity of a scene regardless of the order its shapes are listed in."""
    return tuple(sorted((s.position, s.kind, s.color) for s in shapes))


class DistinctScenes:
    """The distinct-scene sampler: draws scenes that no earlier draw of the run gave.

    Splits (and examples) must never share a scene, so a draw whose key was seen before is refused and drawn
    again. The scene space is finite (90 one-shape scenes), so after `100 * wanted + 10_000` refusals it fails,
    naming how many distinct scenes it found, instead of drawing forever.
    """

    def __init__(self, wanted: int, *, asked: str, detail: str = ""):
        """`wanted`: how many scenes the run needs in all; `asked` and `detail` complete the error message
        ("found only N distinct scenes{detail}; asked for {asked}")."""
        self.seen: set[tuple] = set()
        self.refusals_left = 100 * wanted + 10_000
        self.asked, self.detail = asked, detail

    def accept(self, key: tuple) -> bool:
        """Keep a scene whose key is new (True); refuse a repeat (False), or fail once refusals run out."""
        if key not in self.seen:
            self.seen.add(key)
            return True
        self._refuse()
        return False

    def draw(self, rng: random.Random, max_shapes: int, min_shapes: int = 1) -> list[Shape]:
        """The next `random_scene(rng, max_shapes)` of at least `min_shapes` shapes not drawn before."""
        while True:
            shapes = random_scene(rng, max_shapes)
            if len(shapes) < min_shapes:
                self._refuse()
            elif self.accept(scene_key(shapes)):
                return shapes

    def _refuse(self) -> None:
        self.refusals_left -= 1
        if self.refusals_left < 0:
            raise ConfigError(f"found only {len(self.seen)} distinct scenes{self.detail}; asked for {self.asked}")


def all_one_attribute_alterations(shapes: list[Shape]) -> list[list[Shape]]:
    """Every scene that differs from `shapes` in exactly one attribute of one shape."""
    taken = {s.position for s in shapes}
    scenes = []
    for index, shape in enumerate(shapes):
        variants = [Shape(shape.kind, c, shape.position) for c in sorted(COLORS) if c != shape.color]
        variants += [Shape(k, shape.color, shape.position) for k in SHAPES if k != shape.kind]
        variants += [Shape(shape.kind, shape.color, p) for p in sorted(POSITIONS) if p not in taken]
        scenes += [shapes[:index] + [variant] + shapes[index + 1 :] for variant in variants]
    return scenes


# ------------------------------------------------------------------------------------------------------------
# Task scenes: the scene graph behind the four task kinds (data_synth.tasks)
# ------------------------------------------------------------------------------------------------------------

TASK_SIZES: tuple[str, ...] = ("small", "large")
TASK_COUNTS: tuple[int, ...] = (1, 2, 3, 4)
WORDS: tuple[str, ...] = ("STOP", "EXIT", "OPEN", "SALE", "CAFE", "TAXI", "HOTEL", "PARK", "BANK", "SHOP", "ZOO", "BUS")
"""Short words a task scene may show in its top-left corner (for reading questions)."""
SCENE_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "count", "position", "relation", "text")
"""What a one-attribute hard negative may change. "relation": two shapes on one line swap places, so which is
left of (or above) which flips while every shape keeps its look."""
_ROWS = ({"left", "center", "right"}, {"top", "center", "bottom"})


@dataclass(frozen=True)
class Scene:
    """A scene graph: shapes at distinct positions, and an optional word drawn in the corner."""

    shapes: tuple[Shape, ...]
    text: str | None = None

    def key(self) -> tuple:
        """Identity regardless of the order shapes are listed in: equal keys draw equal images."""
        shapes = tuple(sorted((s.position, s.kind, s.color, s.size, s.count) for s in self.shapes))
        return (shapes, self.text)

    def describe(self) -> str:
        caption = describe(list(self.shapes))
        return f'{caption}, with the word "{self.text}"' if self.text else caption

    def draw(self, size: int = 128, background: tuple[int, int, int] = (255, 255, 255)):
        return draw_scene(list(self.shapes), size=size, background=background, text=self.text)

    def replace_shape(self, index: int, shape: Shape) -> Scene:
        return Scene(self.shapes[:index] + (shape,) + self.shapes[index + 1 :], self.text)


def relation(first: str, second: str) -> str | None:
    """Where position `first` is relative to `second` ("left of", "right of", "above", "below"), or None
    when the two do not share a row or a column."""
    (x1, y1), (x2, y2) = POSITIONS[first], POSITIONS[second]
    if y1 == y2 and x1 != x2:
        return "left of" if x1 < x2 else "right of"
    if x1 == x2 and y1 != y2:
        return "above" if y1 < y2 else "below"
    return None


def related_pairs(scene: Scene) -> list[tuple[int, int]]:
    """Index pairs of shapes that share a row or column and look different: swapping them flips a relation."""
    pairs = []
    for i, a in enumerate(scene.shapes):
        for j in range(i + 1, len(scene.shapes)):
            b = scene.shapes[j]
            if relation(a.position, b.position) is not None and a.appearance() != b.appearance():
                pairs.append((i, j))
    return pairs


def random_task_scene(
    rng: random.Random, *, min_shapes: int = 1, max_shapes: int = 3, text_probability: float = 0.3
) -> Scene:
    """A task scene: 1..max_shapes shapes with a colour, shape, size and count, at distinct positions."""
    count = rng.randint(min_shapes, max_shapes)
    positions = rng.sample(sorted(POSITIONS), count)
    colors = sorted(COLORS)
    shapes = tuple(
        Shape(rng.choice(TASK_SHAPES), rng.choice(colors), position, rng.choice(TASK_SIZES), rng.choice(TASK_COUNTS))
        for position in positions
    )
    text = rng.choice(WORDS) if rng.random() < text_probability else None
    return Scene(shapes, text)


def alter_scene(scene: Scene, attribute: str, rng: random.Random, target: int | None = None) -> Scene | None:
    """The scene with exactly `attribute` changed, on shape `target` (random if None); None if impossible.

    color/shape/size/count: that shape gets another value; position: it moves to a free position; relation: it
    swaps places with a shape on its row or column that looks different; text: the word becomes another one.
    """
    if attribute == "text":
        return Scene(scene.shapes, rng.choice([w for w in WORDS if w != scene.text])) if scene.text else None
    if attribute == "relation":
        pairs = [p for p in related_pairs(scene) if target is None or target in p]
        if not pairs:
            return None
        i, j = rng.choice(pairs)
        a, b = scene.shapes[i], scene.shapes[j]
        swapped = scene.replace_shape(i, Shape(a.kind, a.color, b.position, a.size, a.count))
        return swapped.replace_shape(j, Shape(b.kind, b.color, a.position, b.size, b.count))
    index = rng.randrange(len(scene.shapes)) if target is None else target
    s = scene.shapes[index]
    if attribute == "color":
        new = Shape(s.kind, rng.choice([c for c in sorted(COLORS) if c != s.color]), s.position, s.size, s.count)
    elif attribute == "shape":
        new = Shape(rng.choice([k for k in TASK_SHAPES if k != s.kind]), s.color, s.position, s.size, s.count)
    elif attribute == "size":
        new = Shape(s.kind, s.color, s.position, rng.choice([z for z in TASK_SIZES if z != s.size]), s.count)
    elif attribute == "count":
        new = Shape(s.kind, s.color, s.position, s.size, rng.choice([n for n in TASK_COUNTS if n != s.count]))
    elif attribute == "position":
        free = [p for p in sorted(POSITIONS) if p not in {t.position for t in scene.shapes}]
        if not free:
            return None
        new = Shape(s.kind, s.color, rng.choice(free), s.size, s.count)
    else:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {SCENE_ATTRIBUTES}")
    return scene.replace_shape(index, new)
