"""Baseline statistics: best-of-k and worst-of-n over seeds, per-kind accuracy."""

from __future__ import annotations

import pytest

from noisealign.toy.evaluate import summarise


def _row(prompt_id: str, seed: int, overall: float, relation: float) -> dict:
    concepts = [{"text": "red", "kind": "attribute", "spans": [[2, 5]], "score": 1.0}]
    concepts.append({"text": "x", "kind": "relation", "spans": [[13, 20]], "score": relation})
    return {
        "prompt_id": prompt_id,
        "prompt": "p",
        "seed": seed,
        "overall": overall,
        "concepts": concepts,
    }


def test_best_and_worst_of_k_use_the_first_seeds_per_prompt():
    # prompt a: only seed 5 succeeds (inside best-of-8, outside best-of-4); prompt b: all succeed
    rows = [_row("a", s, float(s == 5), float(s == 5)) for s in range(8)]
    rows += [_row("b", s, 1.0, 1.0) for s in range(8)]
    summary = summarise(rows, seeds_per_prompt=8)
    assert summary["prompts"] == 2 and summary["images"] == 16
    assert summary["mean"] == pytest.approx((1 / 8 + 1) / 2)
    assert summary["best_of_4"] == pytest.approx(0.5)
    assert summary["best_of_8"] == pytest.approx(1.0)
    assert summary["worst_of_8"] == pytest.approx(0.5)
    assert summary["acc_attribute"] == 1.0 and summary["acc_relation"] == pytest.approx(9 / 16)
