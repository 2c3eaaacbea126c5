"""Concept annotations of prompt rows: a ``concepts`` column, or a GenEval ``include`` list.

Read by :mod:`noisealign.data.prompts`; a row with neither is left to the judges' rule-based
splitter (:mod:`noisealign.judges.concepts`).

Example:
    >>> [c.text for c in geneval_concepts([{"class": "cat", "count": 2}], "two cats")]
    ['cat', '2 cat']
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ..errors import DataError
from ..judges.base import Concept


def parse_concepts(raw: Any, prompt: str, where: str) -> tuple[Concept, ...] | None:
    """A row's ``concepts`` value (a list, or its JSON text) as concepts; ``None`` when empty.

    An item is a concept text or a ``{"text", "kind", "spans"}`` mapping; an item without
    spans gets the span of its text in the prompt. ``where`` names the row in errors.
    """
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        raw = json.loads(raw)
    concepts = []
    for item in raw:
        if isinstance(item, str):
            item = {"text": item}
        concept = Concept.from_dict(item)
        if not concept.spans:
            start = prompt.lower().find(concept.text.lower())
            if start < 0:
                raise DataError(
                    f"{where}: concept '{concept.text}' does not occur in the prompt; "
                    "give its spans explicitly"
                )
            concept.spans = [(start, start + len(concept.text))]
        concepts.append(concept)
    return tuple(concepts)


_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def _find(prompt: str, words: Sequence[str], start: int = 0) -> tuple[int, int] | None:
    """Span of the first of ``words`` found in ``prompt`` (whole words, case-insensitive)."""
    for word in words:
        match = re.search(rf"\b{re.escape(word)}\b", prompt[start:], re.IGNORECASE)
        if match:
            return start + match.start(), start + match.end()
    return None


def geneval_concepts(include: list[dict], prompt: str) -> tuple[Concept, ...]:
    """Concepts from a GenEval ``include`` list: objects, colours, counts and positions.

    Each concept's span is found in the prompt (plural forms too); one that cannot be found
    spans the whole prompt, so its score still reaches the prompt's tokens.
    """
    whole = [(0, len(prompt))]
    concepts, objects = [], []
    for item in include:
        name = str(item["class"])
        span = _find(prompt, [name, name + "s", name + "es"])
        objects.append((name, span))
        concepts.append(Concept(name, "object", [span] if span else whole))
        if item.get("color"):
            color = _find(prompt, [item["color"]])
            concepts.append(
                Concept(f"{item['color']} {name}", "attribute", [color] if color else whole)
            )
        count = int(item.get("count", 1))
        if count > 1:
            where = _find(prompt, [_NUMBERS.get(count, str(count)), str(count)])
            concepts.append(Concept(f"{count} {name}", "count", [where] if where else whole))
        if item.get("position"):
            relation, other = item["position"][0], int(item["position"][1])
            where = _find(prompt, [relation])
            text = f"{name} {relation} {objects[other][0] if other < len(objects) else '?'}"
            concepts.append(Concept(text, "relation", [where] if where else whole))
    return tuple(concepts)
