"""The toy grammar: parsing, concept spans, and the held-out composition split."""

from __future__ import annotations

import pytest

from noisealign.toy.grammar import (
    COLOURS,
    RELATIONS,
    SHAPES,
    all_prompts,
    concept_dicts,
    parse_prompt,
    prompt_records,
)
from noisealign.toy.render import phrasings


def test_split_sizes_and_disjointness():
    singles, seen, heldout = all_prompts("single"), all_prompts("seen"), all_prompts("heldout")
    assert len(singles) == len(COLOURS) * len(SHAPES) == 12
    # ordered pairs of objects with different colours, times relations
    assert len(seen) + len(heldout) == 12 * 9 * len(RELATIONS)
    assert len(heldout) == 8 * 2 * len(RELATIONS)  # 8 unordered pairs, both orders
    assert not set(heldout) & set(all_prompts("train"))
    assert set(all_prompts()) == set(singles) | set(seen) | set(heldout)


def test_converse_phrasing_of_a_heldout_prompt_is_heldout_too():
    for prompt in all_prompts("heldout"):
        assert all(p in all_prompts("heldout") for p in phrasings(prompt))


def test_every_object_of_heldout_pairs_is_seen_in_training():
    train_objects = {o.key for p in all_prompts("seen") for o in parse_prompt(p).objects}
    assert {o.key for p in all_prompts("heldout") for o in parse_prompt(p).objects} <= train_objects


def test_concept_spans_point_at_their_words():
    prompt = "a blue square left of a yellow triangle"
    concepts = concept_dicts(prompt)
    words = [(c["kind"], [prompt[s:e] for s, e in c["spans"]]) for c in concepts]
    assert words == [
        ("attribute", ["blue"]),
        ("object", ["square"]),
        ("attribute", ["yellow"]),
        ("object", ["triangle"]),
        ("count", ["a", "a"]),
        ("relation", ["left of"]),
    ]


def test_single_object_concepts():
    assert [c["kind"] for c in concept_dicts("a red circle")] == ["attribute", "object", "count"]


@pytest.mark.parametrize(
    "prompt",
    [
        "a purple circle",
        "a red hexagon",
        "a red circle near a blue square",
        "red circle",
        "a red circle left of a red square",
        "A red circle",
        "",
    ],
)
def test_prompts_outside_the_grammar_raise(prompt):
    with pytest.raises(ValueError, match="not in the toy grammar"):
        parse_prompt(prompt)


def test_prompt_records_are_stable_and_unique():
    records = prompt_records("heldout", limit=10)
    assert records == prompt_records("heldout", limit=10)
    assert len(records) == 10 and len({r["prompt_id"] for r in records}) == 10
    assert set(records[0]) == {"prompt_id", "prompt", "concepts"}
    everything = prompt_records()
    assert len({r["prompt_id"] for r in everything}) == len(everything) == len(all_prompts())


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown split"):
        all_prompts("test")
