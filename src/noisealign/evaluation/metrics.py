"""Alignment metrics of one method against the standard noise, on the same prompts and seeds.

Rows are dicts ``{prompt_id, seed, overall, concepts: [{kind, score}, ...]}`` from one judge;
a method's rows and the standard rows are paired by ``(prompt_id, seed)``.

- alignment: mean judge score over all images.
- per-concept accuracy: share of concepts scored ≥ 0.5, per concept kind (object, attribute,
  count, relation, ...) and over all concepts.
- win rate vs standard: per image 1 if the method's score is higher, ½ if equal, 0 if lower,
  averaged; with the mean score difference, each with a 95% percentile bootstrap interval
  that resamples *prompts* (the seeds of one prompt are not independent).

Example:
    >>> rows = [{"prompt_id": "p", "seed": 0, "overall": 1.0, "concepts": []}]
    >>> base = [{"prompt_id": "p", "seed": 0, "overall": 0.0, "concepts": []}]
    >>> compare(rows, base)["win_rate"]
    1.0
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

CONCEPT_THRESHOLD = 0.5


def alignment(rows: Sequence[dict]) -> float:
    """Mean overall score; NaN rows (judge failures) are left out."""
    scores = np.array([r["overall"] for r in rows], dtype=float)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def concept_accuracy(rows: Sequence[dict]) -> dict[str, float]:
    """``{kind: accuracy, ..., "all": accuracy}`` over the concepts the judge scored."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        for concept in row["concepts"]:
            if concept.get("score") is None:
                continue
            hit = concept["score"] >= CONCEPT_THRESHOLD
            hits[concept["kind"]].append(hit)
            hits["all"].append(hit)
    return {kind: float(np.mean(v)) for kind, v in sorted(hits.items())}


def bootstrap_interval(
    per_prompt: np.ndarray, n: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the mean of ``per_prompt`` (one value per prompt), resampling
    prompts."""
    if len(per_prompt) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = per_prompt[rng.integers(0, len(per_prompt), (n, len(per_prompt)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(rows: Sequence[dict], standard: Sequence[dict], seed: int = 0) -> dict:
    """Win rate and mean difference of ``rows`` vs ``standard``, paired by (prompt_id, seed).

    Returns ``win_rate``, ``win_rate_ci95``, ``difference``, ``difference_ci95`` and the
    ``wins`` / ``ties`` / ``losses`` counts. Pairs where either score is NaN are skipped.
    """
    base = {(r["prompt_id"], r["seed"]): r["overall"] for r in standard}
    outcome: dict[str, list[float]] = defaultdict(list)
    delta: dict[str, list[float]] = defaultdict(list)
    counts = {"wins": 0, "ties": 0, "losses": 0}
    for row in rows:
        other = base.get((row["prompt_id"], row["seed"]))
        if other is None or not np.isfinite(other) or not np.isfinite(row["overall"]):
            continue
        diff = row["overall"] - other
        win = 1.0 if diff > 0 else 0.5 if diff == 0 else 0.0
        counts["wins" if diff > 0 else "ties" if diff == 0 else "losses"] += 1
        outcome[row["prompt_id"]].append(win)
        delta[row["prompt_id"]].append(diff)
    prompts = sorted(outcome)
    wins = np.array([np.mean(outcome[p]) for p in prompts])
    diffs = np.array([np.mean(delta[p]) for p in prompts])
    nan = float("nan")
    return {
        "win_rate": float(wins.mean()) if len(wins) else nan,
        "win_rate_ci95": list(bootstrap_interval(wins, seed=seed)),
        "difference": float(diffs.mean()) if len(diffs) else nan,
        "difference_ci95": list(bootstrap_interval(diffs, seed=seed)),
        **counts,
    }
