"""A compositional prompt set for real text-to-image models, with concept annotations.

Objects × colours × counts × spatial relations, in the style of GenEval / T2I-CompBench:
``"a red bench to the left of a blue car"``, ``"two green apples"``. Every prompt carries
its concepts with character spans, so judges need not split it. Deterministic given seed.

Example:
    >>> rows = compositional_prompts(8, seed=0)
    >>> sorted(rows[0])
    ['concepts', 'prompt', 'prompt_id', 'split']
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OBJECTS = (
    "apple",
    "bench",
    "bicycle",
    "book",
    "bowl",
    "car",
    "cat",
    "chair",
    "clock",
    "cup",
    "dog",
    "guitar",
    "horse",
    "lamp",
    "laptop",
    "umbrella",
    "vase",
    "bird",
    "suitcase",
    "teddy bear",
)
COLOURS = ("red", "green", "blue", "yellow", "black", "white", "purple", "orange", "pink", "brown")
RELATIONS = ("to the left of", "to the right of", "above", "below", "next to")
COUNTS = {"two": 2, "three": 3, "four": 4}


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "sh", "ch")) else "s")


def _object(prompt: str, colour: str, noun: str) -> tuple[str, list[dict]]:
    """Append ``a <colour> <noun>`` to ``prompt``; return it with the object's concepts."""
    article = "an" if colour[0] in "aeiou" else "a"
    start = len(prompt) + len(article) + 1
    text = f"{colour} {noun}"
    concepts = [
        {"text": text, "kind": "object", "spans": [[start, start + len(text)]]},
    ]
    return f"{prompt}{article} {text}", concepts


def compositional_prompts(n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct prompts: 40% colour-relation pairs, 30% counts, 30% colour binding."""
    rng = random.Random(seed)
    rows: dict[str, dict] = {}
    while len(rows) < n:
        kind = rng.random()
        if kind < 0.4:
            (c1, c2), (o1, o2) = rng.sample(COLOURS, 2), rng.sample(OBJECTS, 2)
            relation = rng.choice(RELATIONS)
            prompt, concepts = _object("", c1, o1)
            rel_start = len(prompt) + 1
            prompt, second = _object(prompt + f" {relation} ", c2, o2)
            concepts += second + [
                {
                    "text": prompt,
                    "kind": "relation",
                    "spans": [[rel_start, rel_start + len(relation)]],
                }
            ]
        elif kind < 0.7:
            word, colour, noun = rng.choice(list(COUNTS)), rng.choice(COLOURS), rng.choice(OBJECTS)
            prompt = f"{word} {colour} {_plural(noun)}"
            concepts = [{"text": prompt, "kind": "count", "spans": [[0, len(prompt)]]}]
        else:
            (c1, c2), (o1, o2) = rng.sample(COLOURS, 2), rng.sample(OBJECTS, 2)
            prompt, concepts = _object("", c1, o1)
            prompt, second = _object(prompt + " and ", c2, o2)
            concepts += second
        rows.setdefault(
            prompt, {"prompt_id": f"comp-{len(rows):04d}", "prompt": prompt, "concepts": concepts}
        )
    out = list(rows.values())
    for i, row in enumerate(out):
        row["split"] = "eval" if i % 5 == 4 else "train"
    return out


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
