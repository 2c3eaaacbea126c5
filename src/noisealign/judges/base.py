"""The judge protocol and token-level feedback.

A judge scores images against prompts. Per sample it returns an overall score in [0, 1] and
*part scores* on character spans of the prompt. Character offsets are the bridge to the
diffusion model: :func:`spans_to_token_scores` maps part scores onto the pipeline's own
text tokens, because the reward model and the policy condition on those tokens' embeddings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

logger = logging.getLogger(__name__)

Span = tuple[int, int]


@dataclass
class Concept:
    """One checkable part of a prompt.

    Attributes:
        text: what is checked, e.g. ``"a red circle"`` or ``"a red circle left of a blue square"``.
        kind: ``"object"``, ``"attribute"``, ``"relation"``, ``"count"`` or ``"token"``.
        spans: character spans ``[start, end)`` of the prompt that this concept's score is
            mapped onto (e.g. only ``"left of"`` for a relation).
        score: the judge's score in [0, 1]; ``None`` before judging.
    """

    text: str
    kind: str
    spans: list[Span]
    score: float | None = None

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "kind": self.kind,
            "spans": [list(s) for s in self.spans],
            "score": self.score,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Concept:
        return cls(
            text=data["text"],
            kind=data.get("kind", "object"),
            spans=[tuple(s) for s in data.get("spans", [])],
            score=data.get("score"),
        )


@dataclass
class Feedback:
    """A judge's verdict on one (image, prompt).

    Attributes:
        overall: overall alignment in [0, 1].
        concepts: the concepts that were checked, with scores.
        parts: ``(start, end, score)`` part scores on the prompt's characters. When empty,
            the concepts' spans and scores are used (see :meth:`part_scores`). A
            caption-likelihood judge fills this with one entry per VLM token.
    """

    overall: float
    concepts: list[Concept] = field(default_factory=list)
    parts: list[tuple[int, int, float]] = field(default_factory=list)

    def part_scores(self) -> list[tuple[int, int, float]]:
        if self.parts:
            return list(self.parts)
        return [(s, e, c.score) for c in self.concepts if c.score is not None for s, e in c.spans]


@runtime_checkable
class Judge(Protocol):
    """Scores images against prompts.

    ``score(images, prompts, concepts)``: ``images`` is a list of B RGB PIL images,
    ``prompts`` B strings, ``concepts`` optionally B lists of :class:`Concept` (from the
    prompt file; the judge splits the prompt itself when ``None``). Returns B
    :class:`Feedback`. May raise on a sample it cannot score; callers retry per sample.
    """

    name: str

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        concepts: Sequence[list[Concept] | None] | None = None,
    ) -> list[Feedback]: ...


def spans_to_token_scores(
    parts: Sequence[tuple[int, int, float]],
    offsets: Sequence[Span],
) -> tuple[list[float], list[bool]]:
    """Map character-span part scores onto tokens given their character offsets.

    Args:
        parts: ``(start, end, score)`` on the prompt's characters.
        offsets: one ``(start, end)`` per token of the *pipeline's* tokenizer (length L);
            special and padding tokens have ``start == end`` and never receive a score.

    Returns:
        ``(scores, mask)``, each of length L: a token's score is the mean score of the
        parts its characters overlap; ``mask`` says which tokens received one.
    """
    scores: list[float] = []
    mask: list[bool] = []
    for tok_start, tok_end in offsets:
        hits = [
            score
            for start, end, score in parts
            if tok_end > tok_start and min(end, tok_end) > max(start, tok_start)
        ]
        scores.append(sum(hits) / len(hits) if hits else 0.0)
        mask.append(bool(hits))
    return scores, mask


def score_robustly(
    judge: Judge,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    concepts: Sequence[list[Concept] | None] | None = None,
    *,
    retries: int = 2,
    backoff: float = 0.5,
) -> list[tuple[Feedback | None, str]]:
    """Score a batch; when the batch fails, score sample by sample with retries.

    Returns one ``(feedback, "")`` per sample, or ``(None, error)`` for a sample that still
    fails after ``retries`` extra attempts (with exponential ``backoff`` seconds between),
    so one bad sample or a flaky API never stops a long collection.
    """
    concepts = list(concepts) if concepts is not None else [None] * len(prompts)
    try:
        feedback = judge.score(images, prompts, concepts)
        if len(feedback) != len(prompts):
            raise RuntimeError(f"judge returned {len(feedback)} results for {len(prompts)} samples")
        return [(f, "") for f in feedback]
    except Exception as exc:  # noqa: BLE001 - any judge failure is retried per sample
        logger.warning(
            "judge %s failed on a batch of %d (%s); retrying per sample",
            judge.name,
            len(prompts),
            exc,
        )
    results: list[tuple[Feedback | None, str]] = []
    for image, prompt, concept in zip(images, prompts, concepts):
        error = ""
        for attempt in range(retries + 1):
            try:
                results.append((judge.score([image], [prompt], [concept])[0], ""))
                break
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
                if attempt < retries:
                    time.sleep(backoff * 2**attempt)
        else:
            logger.warning("judge %s failed on prompt '%s': %s", judge.name, prompt[:60], error)
            results.append((None, error))
    return results
