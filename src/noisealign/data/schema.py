"""The schema of collected feedback rows (docs/collect.md): :class:`CollectRow`, once.

One row per (prompt id, seed). ``token_scores`` / ``token_mask`` are aligned to the
*pipeline's* text tokens (length L of its tokenizer), so later stages read them next to
the prompt embeddings without re-tokenizing. The noise is stored only on request: it is
re-derived exactly from ``(prompt_id, seed, latent_shape)`` by :mod:`noisealign.noise`.

The collect stage builds each row as a :class:`CollectRow` and :func:`collect_features` reads
the dataset features off the same fields, so the columns are written down in one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import datasets
from datasets import Array3D, Features, List, Value

from ..judges.base import Concept, Feedback, spans_to_token_scores

CONCEPT_FEATURES = {
    "text": Value("string"),
    "kind": Value("string"),
    "spans": List(List(Value("int32"))),
    "score": Value("float32"),
}


def column(feature: Any, optional: bool = False) -> Any:
    """A :class:`CollectRow` field stored with ``feature`` (a callable of the latent shape for
    shape-dependent ones); ``optional`` columns are written only when the recipe asks."""
    if optional:
        return dataclasses.field(default=None, metadata={"feature": feature, "optional": True})
    return dataclasses.field(metadata={"feature": feature})


@dataclasses.dataclass
class CollectRow:
    """One row of the collect dataset, in column order."""

    prompt_id: str = column(Value("string"))
    prompt: str = column(Value("string"))
    seed: int = column(Value("int64"))
    pipeline: str = column(Value("string"))
    num_inference_steps: int = column(Value("int32"))
    guidance_scale: float = column(Value("float32"))
    height: int = column(Value("int32"))
    width: int = column(Value("int32"))
    latent_shape: list[int] = column(List(Value("int32")))
    judge: str = column(Value("string"))
    overall: float = column(Value("float32"))
    tokens: list[str] = column(List(Value("string")))
    token_scores: list[float] = column(List(Value("float32")))
    token_mask: list[bool] = column(List(Value("bool")))
    concepts: list[dict] = column(List(CONCEPT_FEATURES))
    failed: bool = column(Value("bool"))
    error: str = column(Value("string"))
    image: Any = column(lambda shape: datasets.Image(), optional=True)
    """The generated image (``save_images``)."""
    noise: Any = column(lambda shape: Array3D(shape=tuple(shape), dtype="float32"), optional=True)
    """The initial noise as a (C, H, W) array (``save_noise``)."""

    def to_dict(self) -> dict[str, Any]:
        """The row as the dataset stores it: optional columns only when set."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not f.metadata.get("optional") or getattr(self, f.name) is not None
        }


def collect_features(latent_shape: Sequence[int], save_images: bool, save_noise: bool) -> Features:
    """Features of the collect dataset; the image and noise columns only when asked for."""
    wanted = {"image": save_images, "noise": save_noise}
    features = {}
    for f in dataclasses.fields(CollectRow):
        feature = f.metadata["feature"]
        if f.metadata.get("optional"):
            if not wanted[f.name]:
                continue
            feature = feature(latent_shape)
        features[f.name] = feature
    return Features(features)


def feedback_columns(
    feedback: Feedback | None, error: str, tokens: Sequence[str], offsets: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """The judge-dependent columns of one row; a failed sample gets NaN overall, an empty mask."""
    if feedback is None:
        return {
            "overall": math.nan,
            "tokens": list(tokens),
            "token_scores": [0.0] * len(tokens),
            "token_mask": [False] * len(tokens),
            "concepts": [],
            "failed": True,
            "error": error,
        }
    scores, mask = spans_to_token_scores(feedback.part_scores(), offsets)
    return {
        "overall": float(feedback.overall),
        "tokens": list(tokens),
        "token_scores": scores,
        "token_mask": mask,
        "concepts": [c.to_dict() for c in feedback.concepts],
        "failed": False,
        "error": "",
    }


def concepts_from_row(row: dict[str, Any]) -> list[Concept]:
    return [Concept.from_dict(c) for c in row["concepts"]]
