"""The schema of collected feedback rows (DESIGN.md section 5).

One row per (prompt id, seed). ``token_scores`` / ``token_mask`` are aligned to the
*pipeline's* text tokens (length L of its tokenizer), so later stages read them next to
the prompt embeddings without re-tokenizing. The noise is stored only on request: it is
re-derived exactly from ``(prompt_id, seed, latent_shape)`` by :mod:`noisealign.noise`.
"""

from __future__ import annotations

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


def collect_features(
    latent_shape: Sequence[int], save_images: bool, save_noise: bool, exploration: bool = False
) -> Features:
    """Features of the collect dataset; image, noise and exploration columns only when asked for."""
    features = {
        "prompt_id": Value("string"),
        "prompt": Value("string"),
        "seed": Value("int64"),
        "pipeline": Value("string"),
        "num_inference_steps": Value("int32"),
        "guidance_scale": Value("float32"),
        "height": Value("int32"),
        "width": Value("int32"),
        "latent_shape": List(Value("int32")),
        "judge": Value("string"),
        "overall": Value("float32"),
        "tokens": List(Value("string")),
        "token_scores": List(Value("float32")),
        "token_mask": List(Value("bool")),
        "concepts": List(CONCEPT_FEATURES),
        "failed": Value("bool"),
        "error": Value("string"),
    }
    if save_images:
        features["image"] = datasets.Image()
    if save_noise:
        features["noise"] = Array3D(shape=tuple(latent_shape), dtype="float32")
    if exploration:
        features["exploration_gamma"] = Value("float32")
    return Features(features)


def feedback_columns(
    feedback: Feedback | None, error: str, tokens: Sequence[str], offsets: Sequence[tuple[int, int]]
) -> dict[str, Any]:
    """The judge-dependent columns of one row; a failed sample gets NaN overall and an empty mask."""
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
