"""The shapes judge: exact on ground-truth renders, strict on wrong prompts."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from noisealign.judges import Judge, build_judge, spans_to_token_scores
from noisealign.toy.grammar import COLOURS, CONVERSE, SHAPES, make_prompt, parse_prompt
from noisealign.toy.judge import ShapesJudge
from noisealign.toy.render import render_prompt


def test_judge_is_registered_and_follows_the_protocol():
    judge = build_judge("shapes")
    assert isinstance(judge, Judge) and judge.name == "shapes"


def test_exact_on_ground_truth_renders(judge, renders):
    assert len(renders) >= 1000
    feedback = judge.score([im for _, im in renders], [p for p, _ in renders])
    failures = [
        (p, [(c.text, c.score) for c in f.concepts])
        for (p, _), f in zip(renders, feedback)
        if f.overall != 1.0
    ]
    assert not failures, failures[:5]
    assert all(c.score == 1.0 for f in feedback for c in f.concepts)


def _wrong_variants(prompt: str) -> list[tuple[str, int]]:
    """Wrong prompts for an image of ``prompt``, with the index of the concept that must fail."""
    parsed = parse_prompt(prompt)
    objects = [o.key for o in parsed.objects]
    (c1, s1) = objects[0]
    other_colour = next(c for c in COLOURS if c not in {o[0] for o in objects})
    other_shape = next(s for s in SHAPES if s != s1)
    variants = [
        (make_prompt([(other_colour, s1), *objects[1:]], parsed.relation), 0),
        (make_prompt([(c1, other_shape), *objects[1:]], parsed.relation), 1),
    ]
    if parsed.relation is None:
        variants.append(
            (make_prompt([objects[0], (other_colour, s1)], "left of"), 4)
        )  # one object too few
    else:
        variants.append((make_prompt(objects, CONVERSE[parsed.relation]), 5))
        variants.append((make_prompt(objects[:1]), 2))  # one object too many
    return variants


def test_zero_on_wrong_prompts_and_blames_the_right_concept(judge, renders):
    images, prompts, culprits = [], [], []
    for prompt, image in renders[:400]:
        for wrong, culprit in _wrong_variants(prompt):
            images.append(image)
            prompts.append(wrong)
            culprits.append(culprit)
    feedback = judge.score(images, prompts)
    assert all(f.overall == 0.0 for f in feedback)
    for f, culprit, prompt in zip(feedback, culprits, prompts):
        scores = [c.score for c in f.concepts]
        assert scores[culprit] == 0.0, (prompt, scores)
        if culprit in (0, 1, 5):  # a single wrong word leaves every other concept right
            assert sum(scores) == len(scores) - 1, (prompt, scores)


def test_blue_circle_for_red_circle_scores_shape_word_only(judge):
    image = render_prompt("a blue circle", random.Random(0))
    (feedback,) = judge.score([image], ["a red circle"])
    assert [(c.text, c.score) for c in feedback.concepts] == [
        ("red", 0.0),
        ("circle", 1.0),
        ("1 object", 1.0),
    ]
    # part scores land on the words: "red" at 2-5, "circle" at 6-12
    assert (2, 5, 0.0) in feedback.part_scores() and (6, 12, 1.0) in feedback.part_scores()
    scores, mask = spans_to_token_scores(
        feedback.part_scores(), [(0, 0), (0, 1), (2, 5), (6, 12), (12, 12)]
    )
    assert scores == [0.0, 1.0, 0.0, 1.0, 0.0] and mask == [False, True, True, True, False]


def test_fraction_mode_and_blank_image():
    blank = Image.new("RGB", (32, 32), (235, 235, 235))
    (strict,) = ShapesJudge().score([blank], ["a red circle above a blue square"])
    assert strict.overall == 0.0 and all(c.score == 0.0 for c in strict.concepts)
    image = render_prompt("a blue circle", random.Random(0))
    (partial,) = ShapesJudge(overall="fraction").score([image], ["a red circle"])
    assert partial.overall == pytest.approx(2 / 3)


def test_rejects_prompts_outside_the_grammar_and_bad_arguments(judge):
    image = render_prompt("a red circle", random.Random(0))
    with pytest.raises(ValueError, match="not in the toy grammar"):
        judge.score([image], ["a photo of a cat"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        judge.score([image, image], ["a red circle"])
    with pytest.raises(ValueError, match="overall"):
        ShapesJudge(overall="mean")
