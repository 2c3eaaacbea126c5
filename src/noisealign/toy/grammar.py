"""The toy world's prompt grammar, its concepts, and the held-out composition split.

Grammar (every prompt is lower case, single spaces, no trailing period)::

    prompt   := object | object " " relation " " object
    object   := "a " colour " " shape
    colour   := red | green | blue | yellow
    shape    := circle | square | triangle
    relation := "left of" | "right of" | "above" | "below"

The two objects of a prompt have different colours: colour is what tells objects apart in
the image, so the judge can bind each object of the prompt to a blob without ambiguity.

Held-out compositions are *unordered* object pairs: "a red circle left of a blue square" and
"a blue square right of a red circle" describe the same picture, so a pair is held out with
all its relations and both orders, and no training scene shows the two objects together.

Example:
    >>> parse_prompt("a red circle left of a blue square").relation
    'left of'
    >>> len(prompt_records("heldout")) > 0
    True
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")


def relation_axes(dx: float, dy: float, relation: str) -> tuple[float, float]:
    """``(main, cross)`` offsets of the second object from the first for ``relation``.

    ``main > 0`` when the first object lies in the named direction; image y grows downwards.
    The renderer and the judge both decide relations from these two numbers.
    """
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[
        relation
    ]


# Each relation read from the second object's point of view, for the converse phrasing.
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
WORDS = ("a", *COLOURS, *SHAPES, "left", "right", "of", "above", "below")
MAX_TOKENS = 16  # longest prompt is 8 words + BOS/EOS; 16 leaves room and stays tiny

ObjectKey = tuple[str, str]  # (colour, shape)

_OBJECT = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_PROMPT_RE = re.compile(rf"^{_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT})?$")

# 8 of the 54 unordered pairs of different-coloured objects, chosen so that every colour
# and every shape occurs in some held-out pair; frozen here so the split never moves.
HELDOUT_PAIRS: tuple[frozenset[ObjectKey], ...] = tuple(
    frozenset(p)
    for p in (
        (("red", "circle"), ("blue", "square")),
        (("green", "triangle"), ("yellow", "circle")),
        (("blue", "triangle"), ("red", "square")),
        (("yellow", "square"), ("green", "circle")),
        (("red", "triangle"), ("yellow", "triangle")),
        (("blue", "circle"), ("green", "square")),
        (("yellow", "triangle"), ("blue", "circle")),
        (("green", "square"), ("red", "circle")),
    )
)


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a prompt and the character spans of its words."""

    colour: str
    shape: str
    article_span: tuple[int, int]
    colour_span: tuple[int, int]
    shape_span: tuple[int, int]

    @property
    def key(self) -> ObjectKey:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt of the grammar: one or two objects and, for two, the relation of the first to the
    second."""

    prompt: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    relation_span: tuple[int, int] | None = None


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a toy prompt; raise ``ValueError`` naming the grammar when it is not one."""
    match = _PROMPT_RE.match(prompt)
    if match is None or (match.group(3) and match.group(1) == match.group(4)):
        raise ValueError(
            f"prompt {prompt!r} is not in the toy grammar: expected 'a COLOUR SHAPE' or "
            f"'a COLOUR SHAPE RELATION a COLOUR SHAPE' with colours {COLOURS} (two different), "
            f"shapes {SHAPES}, relations {RELATIONS}"
        )

    def obj(colour_group: int, shape_group: int) -> ObjectSpec:
        colour_span = match.span(colour_group)
        return ObjectSpec(
            colour=match.group(colour_group),
            shape=match.group(shape_group),
            article_span=(colour_span[0] - 2, colour_span[0] - 1),
            colour_span=colour_span,
            shape_span=match.span(shape_group),
        )

    if match.group(3) is None:
        return ParsedPrompt(prompt, (obj(1, 2),))
    return ParsedPrompt(prompt, (obj(1, 2), obj(4, 5)), match.group(3), match.span(3))


def make_prompt(objects: list[ObjectKey], relation: str | None = None) -> str:
    """The grammar's sentence for one object, or two objects and a relation."""
    words = [f"a {c} {s}" for c, s in objects]
    return words[0] if relation is None else f"{words[0]} {relation} {words[1]}"


def concept_dicts(prompt: str) -> list[dict]:
    """Concept annotations ``{text, kind, spans}`` of a prompt, in the judge's order.

    Per object a colour concept on the colour word and a shape concept on the shape word;
    a ``count`` concept on the articles (each "a" says *one* such object); for two objects a
    relation concept on the relation words.
    """
    parsed = parse_prompt(prompt)
    concepts: list[dict] = []
    for o in parsed.objects:
        concepts.append({"text": o.colour, "kind": "attribute", "spans": [list(o.colour_span)]})
        concepts.append({"text": o.shape, "kind": "object", "spans": [list(o.shape_span)]})
    n = len(parsed.objects)
    concepts.append(
        {
            "text": f"{n} object{'s' if n > 1 else ''}",
            "kind": "count",
            "spans": [list(o.article_span) for o in parsed.objects],
        }
    )
    if parsed.relation is not None:
        concepts.append({"text": prompt, "kind": "relation", "spans": [list(parsed.relation_span)]})
    return concepts


def prompt_id(prompt: str) -> str:
    """A readable stable id: ``toy-red_circle-left_of-blue_square``."""
    return "toy-" + prompt.removeprefix("a ").replace(" a ", "-").replace(" ", "_")


def is_heldout(objects: list[ObjectKey]) -> bool:
    """Whether a two-object scene shows a held-out pair."""
    return len(objects) == 2 and frozenset(objects) in HELDOUT_PAIRS


def all_prompts(split: str = "all") -> list[str]:
    """Every prompt of the grammar in a fixed order.

    Args:
        split: ``"all"``; ``"single"`` (one object); ``"train"`` (singles and two-object
            prompts whose pair is not held out); ``"seen"`` (two-object training prompts);
            ``"heldout"`` (two-object prompts of held-out pairs).
    """
    objects = list(itertools.product(COLOURS, SHAPES))
    singles = [make_prompt([o]) for o in objects]
    pairs = [(a, b) for a, b in itertools.product(objects, objects) if a[0] != b[0]]
    seen = [make_prompt([a, b], r) for a, b in pairs for r in RELATIONS if not is_heldout([a, b])]
    heldout = [make_prompt([a, b], r) for a, b in pairs for r in RELATIONS if is_heldout([a, b])]
    splits = {
        "all": singles + seen + heldout,
        "single": singles,
        "train": singles + seen,
        "seen": seen,
        "heldout": heldout,
    }
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(splits)}")
    return splits[split]


def prompt_records(split: str = "all", limit: int | None = None, seed: int = 0) -> list[dict]:
    """Prompt records ``{prompt_id, prompt, concepts}`` of a split (see :func:`all_prompts`).

    With ``limit`` a fixed random subset (``random.Random(seed)``) in grammar order, so
    benchmarks on "40 prompts" always mean the same 40.
    """
    prompts = all_prompts(split)
    if limit is not None and limit < len(prompts):
        keep = set(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = [p for i, p in enumerate(prompts) if i in keep]
    return [{"prompt_id": prompt_id(p), "prompt": p, "concepts": concept_dicts(p)} for p in prompts]
