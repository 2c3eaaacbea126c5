"""The bridge from judge feedback to the diffusion model's tokens, the splitter, the registry."""

from __future__ import annotations

import pytest

from noisealign.errors import JudgeError
from noisealign.judges import Concept, Feedback, build_judge, spans_to_token_scores, split_concepts
from noisealign.judges.vlm import VLMJudge
from noisealign.pipelines.tokenizers import build_clip_tokenizer

PROMPT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    words = ["a", "red", "circle", "left", "of", "blue", "square", "cat", "dog"]
    return build_clip_tokenizer(
        words, tmp_path_factory.mktemp("clip_tokenizer"), model_max_length=16
    )


def _encode(tokenizer, prompt: str):
    encoded = tokenizer(prompt, padding="max_length", max_length=16, return_offsets_mapping=True)
    return tokenizer.convert_ids_to_tokens(encoded["input_ids"]), encoded["offset_mapping"]


def test_concept_scores_land_on_clip_tokens(clip_tokenizer):
    concepts = split_concepts(PROMPT)
    for concept, score in zip(concepts, (0.9, 0.2, 0.6)):
        concept.score = score
    tokens, offsets = _encode(clip_tokenizer, PROMPT)
    scores, mask = spans_to_token_scores(Feedback(0.5, concepts).part_scores(), offsets)
    by_token = {tok: (s, m) for tok, s, m in zip(tokens, scores, mask)}
    assert by_token["red</w>"] == (0.9, True) and by_token["circle</w>"] == (0.9, True)
    assert by_token["blue</w>"] == (0.2, True) and by_token["square</w>"] == (0.2, True)
    assert by_token["left</w>"] == (0.6, True) and by_token["of</w>"] == (0.6, True)
    assert len(tokens) == 16 and tokens[0] == "<|startoftext|>"
    assert mask[0] is False  # start token
    assert not any(mask[9:]) and all(s == 0.0 for s in scores[9:])  # end + padding
    assert [m for tok, m in zip(tokens, mask) if tok == "a</w>"] == [
        False,
        False,
    ]  # determiners are no concept


def test_overlapping_parts_are_averaged(clip_tokenizer):
    tokens, offsets = _encode(clip_tokenizer, PROMPT)
    parts = [(2, 12, 1.0), (6, 12, 0.0)]  # "red circle" and "circle"
    scores, mask = spans_to_token_scores(parts, offsets)
    assert scores[tokens.index("red</w>")] == 1.0
    assert scores[tokens.index("circle</w>")] == 0.5


def test_caption_parts_map_one_to_one_onto_clip_words(clip_tokenizer, tiny_vlm_folders, images):
    """The VLM's tokens and CLIP's differ, the characters they cover do not."""
    feedback = VLMJudge(str(tiny_vlm_folders["qwen2_vl"]), method="caption").score(
        images[:1], [PROMPT]
    )[0]
    tokens, offsets = _encode(clip_tokenizer, PROMPT)
    scores, mask = spans_to_token_scores(feedback.part_scores(), offsets)
    by_span = {(s, e): p for s, e, p in feedback.parts}
    assert sorted(by_span) == sorted(
        (s, e) for s, e in offsets if e > s
    )  # same words, same characters
    for (start, end), score, hit in zip(offsets, scores, mask):
        assert hit == (end > start)
        if hit:
            assert score == pytest.approx(by_span[start, end])


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            PROMPT,
            [
                ("red circle", "object", "red circle"),
                ("blue square", "object", "blue square"),
                (PROMPT, "relation", "left of"),
            ],
        ),
        ("A photo of a cat and a dog.", [("cat", "object", "cat"), ("dog", "object", "dog")]),
        (
            "two dogs and a yellow tree, a small house",
            [
                ("two dogs", "object", "two dogs"),
                ("yellow tree", "object", "yellow tree"),
                ("small house", "object", "small house"),
            ],
        ),
        (
            "a green star to the left of the big car",
            [
                ("green star", "object", "green star"),
                ("big car", "object", "big car"),
                ("a green star to the left of the big car", "relation", "to the left of"),
            ],
        ),
        ("a cat above", [("cat", "object", "cat")]),
    ],
)
def test_split_concepts(prompt, expected):
    concepts = split_concepts(prompt)
    assert [(c.text, c.kind, prompt[c.spans[0][0] : c.spans[0][1]]) for c in concepts] == expected
    assert all(len(c.spans) == 1 for c in concepts)


def test_concept_round_trip():
    concept = Concept("red circle", "object", [(2, 12)], 0.25)
    assert Concept.from_dict(concept.to_dict()) == concept


def test_unknown_judge_lists_known_judges():
    with pytest.raises(JudgeError, match="unknown judge 'nope'") as error:
        build_judge("nope")
    for name in ("clip", "openai", "vlm"):
        assert name in str(error.value)


def test_bad_judge_kwargs_are_a_judge_error(tiny_clip_folder):
    with pytest.raises(JudgeError, match="does not accept judge_kwargs"):
        build_judge("clip", model=str(tiny_clip_folder), temperature=0.1)
