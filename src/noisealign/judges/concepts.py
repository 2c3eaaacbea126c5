"""A light rule-based prompt splitter: objects with their attributes, and relations.

``"a red circle left of a blue square"`` gives the objects ``"red circle"`` and
``"blue square"`` and the relation ``"a red circle left of a blue square"`` whose score is
mapped onto the characters of ``"left of"``. Prompts whose concepts this cannot find
should carry annotations in the prompt file instead (see :mod:`noisealign.data.prompts`).

Example:
    >>> [c.text for c in split_concepts("a red circle left of a blue square")]
    ['red circle', 'blue square', 'a red circle left of a blue square']
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .base import Concept

# Longest phrases first so "to the left of" wins over "left of".
RELATIONS = (
    "to the left of",
    "to the right of",
    "in front of",
    "on top of",
    "next to",
    "left of",
    "right of",
    "above",
    "below",
    "under",
    "beneath",
    "behind",
    "beside",
    "near",
)
_RELATION_RE = re.compile(
    r"\b(" + "|".join(re.escape(r) for r in RELATIONS) + r")\b", re.IGNORECASE
)
_SEPARATOR_RE = re.compile(r"\s*,\s*(?:and\s+|with\s+)?|\s+and\s+|\s+with\s+", re.IGNORECASE)
# Framing words ("a photo of") and determiners are not part of what the image must show.
_DETERMINER_RE = re.compile(
    r"^(?:(?:a|an|the)\s+)?(?:(?:photo|picture|image|painting|drawing|rendering)\s+of\s+)?"
    r"(?:(?:a|an|the|some)\s+)?",
    re.IGNORECASE,
)


def _objects(prompt: str, start: int, end: int) -> list[Concept]:
    """Object concepts in ``prompt[start:end]``, split at commas / 'and' / 'with'."""
    concepts = []
    cursor = start
    pieces = [
        (m.start() + start, m.end() + start) for m in _SEPARATOR_RE.finditer(prompt[start:end])
    ]
    for sep_start, sep_end in [*pieces, (end, end)]:
        chunk_start, chunk_end = cursor, sep_start
        cursor = sep_end
        text = prompt[chunk_start:chunk_end]
        stripped = text.strip(" .;:!?")
        if not stripped:
            continue
        chunk_start += text.index(stripped)
        determiner = _DETERMINER_RE.match(stripped)
        if determiner:
            chunk_start += determiner.end()
            stripped = stripped[determiner.end() :]
        if stripped:
            concepts.append(
                Concept(stripped, "object", [(chunk_start, chunk_start + len(stripped))])
            )
    return concepts


def split_concepts(prompt: str) -> list[Concept]:
    """Split ``prompt`` into object concepts and at most one relation concept."""
    match = _RELATION_RE.search(prompt)
    if match is None:
        return _objects(prompt, 0, len(prompt))
    concepts = _objects(prompt, 0, match.start()) + _objects(prompt, match.end(), len(prompt))
    if len(concepts) >= 2:
        concepts.append(Concept(prompt.strip(" ."), "relation", [(match.start(), match.end())]))
    return concepts


def resolve_concepts(
    images: Sequence[Any], prompts: Sequence[str], concepts: Sequence[list[Concept] | None] | None
) -> list[list[Concept]]:
    """The concepts to check per sample: the given ones, else :func:`split_concepts`.

    Every judge's ``score`` starts here, so all judges treat missing annotations alike.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    given = concepts if concepts is not None else [None] * len(prompts)
    if len(given) != len(prompts):
        raise ValueError(f"got {len(given)} concept lists for {len(prompts)} prompts")
    return [c if c is not None else split_concepts(p) for c, p in zip(given, prompts)]
