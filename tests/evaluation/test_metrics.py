import math

import numpy as np
import pytest

from noisealign.evaluation.metrics import alignment, bootstrap_interval, compare, concept_accuracy


def row(pid, seed, overall, concepts=()):
    return {"prompt_id": pid, "seed": seed, "overall": overall, "concepts": list(concepts)}


def test_alignment_skips_failed_rows():
    assert alignment([row("a", 0, 1.0), row("a", 1, 0.0), row("b", 0, float("nan"))]) == 0.5
    assert math.isnan(alignment([row("a", 0, float("nan"))]))


def test_concept_accuracy_by_kind_with_threshold():
    rows = [
        row("a", 0, 1, [{"kind": "object", "score": 1.0}, {"kind": "relation", "score": 0.0}]),
        row("a", 1, 0, [{"kind": "object", "score": 0.5}, {"kind": "relation", "score": 0.49}]),
        row("b", 0, 0, [{"kind": "object", "score": None}]),  # unscored: left out
    ]
    assert concept_accuracy(rows) == {"all": 0.5, "object": 1.0, "relation": 0.0}


def test_compare_hand_computed():
    standard = [row("a", 0, 0.0), row("a", 1, 1.0), row("b", 0, 0.5), row("b", 1, 0.5)]
    method = [row("a", 0, 1.0), row("a", 1, 1.0), row("b", 0, 0.0), row("b", 1, 0.5)]
    result = compare(method, standard)
    # prompt a: win + tie = 0.75; prompt b: loss + tie = 0.25 -> mean 0.5
    assert result["win_rate"] == pytest.approx(0.5)
    # differences: a (1 + 0)/2 = 0.5, b (-0.5 + 0)/2 = -0.25 -> mean 0.125
    assert result["difference"] == pytest.approx(0.125)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 1)
    low, high = result["difference_ci95"]
    assert -0.25 <= low <= 0.125 <= high <= 0.5


def test_compare_skips_missing_and_nan_pairs():
    standard = [row("a", 0, 0.0), row("a", 1, float("nan"))]
    method = [row("a", 0, 1.0), row("a", 1, 1.0), row("c", 0, 1.0)]
    result = compare(method, standard)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 0, 0)


def test_bootstrap_interval_is_deterministic_and_covers_the_mean():
    values = np.array([0.1, 0.4, -0.2, 0.3, 0.0])
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high
    assert bootstrap_interval(np.array([0.2, 0.2])) == (0.2, 0.2)
