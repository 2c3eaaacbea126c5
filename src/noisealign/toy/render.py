"""Ground-truth renders of toy prompts: 32x32 RGB, plain light background, 1 or 2 shapes.

Shapes are drawn at 4x and downsampled (anti-aliased), axis-aligned, with a side of 8-11
pixels. Two objects never touch and their relation holds with a margin: the main-axis
distance between centres is at least twice the cross-axis one, so the judge's rule
(sign of the dominant axis) is never borderline on a ground-truth render.

Example:
    >>> image = render_prompt("a red circle left of a blue square", random.Random(0))
    >>> image.size
    (32, 32)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .grammar import CONVERSE, ObjectKey, parse_prompt, relation_axes

SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (235, 235, 235)
# Saturated colours with well separated hues: blending with the grey background (blur,
# anti-aliasing, a VAE's softness) lowers saturation but keeps the hue, which the judge reads.
PALETTE = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 65, 215),
    "yellow": (235, 200, 20),
}
MIN_SIDE, MAX_SIDE = 8.0, 11.0


@dataclass(frozen=True)
class Placed:
    """An object placed in the image: centre ``(cx, cy)`` and side, in pixels."""

    colour: str
    shape: str
    cx: float
    cy: float
    side: float


def _relation_holds(a: Placed, b: Placed, relation: str) -> bool:
    main, cross = relation_axes(b.cx - a.cx, b.cy - a.cy, relation)
    return main >= (a.side + b.side) / 2 + 2 and abs(cross) <= main / 2


def place(objects: list[ObjectKey], relation: str | None, rng: random.Random) -> list[Placed]:
    """Random placement of the objects so that the first stands in ``relation`` to the second."""
    for _ in range(1000):
        placed = []
        for colour, shape in objects:
            side = rng.uniform(MIN_SIDE, MAX_SIDE)
            lo, hi = side / 2 + 1, SIZE - side / 2 - 1
            placed.append(Placed(colour, shape, rng.uniform(lo, hi), rng.uniform(lo, hi), side))
        if relation is None or _relation_holds(placed[0], placed[1], relation):
            return placed
    raise RuntimeError(
        f"could not place {objects} {relation}"
    )  # pragma: no cover - never in practice


def draw(placed: list[Placed]) -> Image.Image:
    """Render placed objects on the background."""
    big = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), BACKGROUND)
    pen = ImageDraw.Draw(big)
    for o in placed:
        x0, y0 = (o.cx - o.side / 2) * SUPERSAMPLE, (o.cy - o.side / 2) * SUPERSAMPLE
        x1, y1 = (o.cx + o.side / 2) * SUPERSAMPLE, (o.cy + o.side / 2) * SUPERSAMPLE
        colour = PALETTE[o.colour]
        if o.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=colour)
        elif o.shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=colour)
        else:  # upward isosceles triangle filling its box
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return big.resize((SIZE, SIZE), Image.Resampling.BOX)


def render_prompt(prompt: str, rng: random.Random) -> Image.Image:
    """A random ground-truth image of a prompt of the grammar."""
    parsed = parse_prompt(prompt)
    return draw(place([o.key for o in parsed.objects], parsed.relation, rng))


def phrasings(prompt: str) -> list[str]:
    """Every prompt that describes the same scenes: itself, and the converse of a relation."""
    parsed = parse_prompt(prompt)
    if parsed.relation is None:
        return [prompt]
    (c1, s1), (c2, s2) = (o.key for o in parsed.objects)
    return [prompt, f"a {c2} {s2} {CONVERSE[parsed.relation]} a {c1} {s1}"]


def render_batch(prompts: list[str], seed: int) -> np.ndarray:
    """``(B, 32, 32, 3)`` uint8 ground-truth renders, reproducible from ``seed``."""
    rng = random.Random(seed)
    return np.stack([np.asarray(render_prompt(p, rng)) for p in prompts])
