"""Scenes of simple shapes drawn with PIL, with the captions that describe them.

The procedural data of the embedded default: no model and no download, yet images whose content a caption
pins down exactly (colour, shape, position), so that retrieval can be learned and measured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}


@dataclass(frozen=True)
class Shape:
    """One shape of a scene: what it is, its colour, and where it sits."""

    kind: str
    color: str
    position: str

    def describe(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.kind} {where}"


def describe(shapes: list[Shape]) -> str:
    """The caption of a scene, e.g. 'a red circle on the left and a blue square on the right'."""
    return " and ".join(shape.describe() for shape in shapes)


def draw_scene(shapes: list[Shape], size: int = 112, background: tuple[int, int, int] = (255, 255, 255)):
    """Draw the shapes on a square canvas of `size` pixels."""
    image = Image.new("RGB", (size, size), background)
    canvas = ImageDraw.Draw(image)
    radius = size * 0.16
    for shape in shapes:
        cx, cy = (coordinate * size for coordinate in POSITIONS[shape.position])
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            canvas.ellipse(box, fill=fill)
        elif shape.kind == "square":
            canvas.rectangle(box, fill=fill)
        elif shape.kind == "triangle":
            canvas.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape.kind!r}; expected one of {SHAPES}")
    return image


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
