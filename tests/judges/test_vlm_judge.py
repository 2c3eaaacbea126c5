"""VLMJudge on tiny random LLaVA, Qwen2-VL and Qwen2.5-VL: values checked against raw forwards."""

from __future__ import annotations

import pytest
import torch

from noisealign.errors import JudgeError
from noisealign.judges import Concept, build_judge, split_concepts
from noisealign.judges.vlm import VLMJudge
from noisealign.testing.vlms import BUILDERS

VLM_ARCHS = tuple(BUILDERS)

METHODS = ("concepts", "caption")


@pytest.fixture(scope="module")
def judges(tiny_vlm_folders) -> dict:
    return {
        (arch, method): VLMJudge(str(tiny_vlm_folders[arch]), method=method, batch_size=4)
        for arch in VLM_ARCHS
        for method in METHODS
    }


def _raw_logits(judge: VLMJudge, image, chat: str) -> torch.Tensor:
    """Full (L, V) logits of one chat sequence, no padding, no logits_to_keep."""
    inputs = judge.processor(
        images=[image] if image is not None else None, text=[chat], return_tensors="pt"
    )
    with torch.no_grad():
        return judge.model(**inputs).logits[0].float()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_feedback_shape_and_range(judges, images, prompts, arch, method):
    judge = judges[arch, method]
    feedback = judge.score(images, prompts)
    assert judge.name == f"vlm:{arch}:{method}"
    assert len(feedback) == len(prompts)
    for fb, prompt in zip(feedback, prompts):
        assert 0.0 <= fb.overall <= 1.0
        expected = split_concepts(prompt)
        assert [(c.text, c.spans) for c in fb.concepts] == [(c.text, c.spans) for c in expected]
        assert all(0.0 <= c.score <= 1.0 for c in fb.concepts)
        assert fb.part_scores()
    # the scores depend on the image and the question: a judge that returns constants fails here
    assert len({round(fb.overall, 6) for fb in feedback}) == len(feedback)


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_yes_probability_equals_hand_computation(judges, images, prompts, arch):
    judge = judges[arch, "concepts"]
    question = judge.question.format(text=prompts[0])
    chat = judge.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    last = _raw_logits(judge, images[0], chat)[-1]
    yes = judge.tokenizer.convert_tokens_to_ids(["yes", "Yes", "YES", "Ġyes", "ĠYes", "ĠYES"])
    no = judge.tokenizer.convert_tokens_to_ids(["no", "No", "NO", "Ġno", "ĠNo", "ĠNO"])
    assert sorted(yes) == judge.yes_ids and sorted(no) == judge.no_ids
    p_yes, p_no = last[yes].exp().sum(), last[no].exp().sum()
    expected = (p_yes / (p_yes + p_no)).item()
    assert judge.score(images[:1], prompts[:1])[0].overall == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_caption_parts_are_prompt_tokens_with_pmi(judges, images, prompts, arch):
    judge = judges[arch, "caption"]
    prompt = prompts[0]
    feedback = judge.score(images[:1], [prompt])[0]
    words = prompt.split()
    assert [
        prompt[s:e] for s, e, _ in feedback.parts
    ] == words  # tiny vocabulary: one token per word
    ids = judge.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    decoded = [judge.tokenizer.decode([i]).strip() for i in ids]
    assert decoded == words

    # PMI of each word by hand: log p(word | image, prefix) - log p(word | prefix)
    pmis = []
    for with_image in (True, False):
        content = ([{"type": "image"}] if with_image else []) + [
            {"type": "text", "text": judge.caption_instruction}
        ]
        chat = judge.processor.apply_chat_template(
            [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": prompt}]},
            ],
            tokenize=False,
        )
        row = judge.processor(images=[images[0]] if with_image else None, text=[chat])["input_ids"][
            0
        ]
        answer = judge.tokenizer(
            (" " if arch.startswith("llava") else "") + prompt, add_special_tokens=False
        )["input_ids"]
        start = max(i for i in range(len(row)) if row[i : i + len(answer)] == answer)
        logprobs = torch.log_softmax(
            _raw_logits(judge, images[0] if with_image else None, chat), dim=-1
        )
        pmis.append(torch.stack([logprobs[start + k - 1, t] for k, t in enumerate(answer)]))
    pmi = pmis[0] - pmis[1]
    assert [score for _, _, score in feedback.parts] == pytest.approx(
        torch.sigmoid(pmi).tolist(), abs=1e-5
    )
    assert feedback.overall == pytest.approx(torch.sigmoid(pmi.mean()).item(), abs=1e-5)


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_caption_concept_score_is_mean_of_its_tokens(judges, images, prompts, arch):
    feedback = judges[arch, "caption"].score(images[:1], prompts[:1])[0]
    for concept in feedback.concepts:
        hits = [
            p
            for s, e, p in feedback.parts
            if any(min(e, ce) > max(s, cs) for cs, ce in concept.spans)
        ]
        assert hits and concept.score == pytest.approx(sum(hits) / len(hits))
    relation = feedback.concepts[-1]
    assert relation.kind == "relation"
    left_of = [p for s, e, p in feedback.parts if prompts[0][s:e] in ("left", "of")]
    assert relation.score == pytest.approx(sum(left_of) / 2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_batch_equals_single_and_deterministic(judges, images, prompts, arch, method):
    judge = judges[arch, method]
    batched = judge.score(images, prompts)
    again = judge.score(images, prompts)
    assert [fb.overall for fb in batched] == [fb.overall for fb in again]
    for i in range(len(prompts)):
        single = judge.score(images[i : i + 1], prompts[i : i + 1])[0]
        assert single.overall == pytest.approx(batched[i].overall, abs=1e-4)
        assert [c.score for c in single.concepts] == pytest.approx(
            [c.score for c in batched[i].concepts], abs=1e-4
        )
        assert [p[:2] for p in single.parts] == [p[:2] for p in batched[i].parts]
        assert [p[2] for p in single.parts] == pytest.approx(
            [p[2] for p in batched[i].parts], abs=1e-4
        )


def test_given_concepts_are_scored_and_none_entries_split(judges, images, prompts):
    judge = judges["qwen2_vl", "concepts"]
    given = [Concept("red circle", "object", [(2, 12)]), Concept("circle", "object", [(6, 12)])]
    feedback = judge.score(images[:2], prompts[:2], [given, None])
    assert [(c.text, c.spans) for c in feedback[0].concepts] == [
        ("red circle", [(2, 12)]),
        ("circle", [(6, 12)]),
    ]
    assert given[0].score is None  # the caller's concepts are not mutated
    assert feedback[0].concepts[0].score == pytest.approx(
        judge.yes_probability(images[:1], ["red circle"]).item()
    )
    assert [c.text for c in feedback[1].concepts] == ["cat"]
    assert feedback[0].part_scores() == [
        (2, 12, feedback[0].concepts[0].score),
        (6, 12, feedback[0].concepts[1].score),
    ]


def test_registry_builds_vlm_judge_and_rejects_bad_arguments(tiny_vlm_folders):
    judge = build_judge("vlm", model=str(tiny_vlm_folders["llava"]), method="caption")
    assert isinstance(judge, VLMJudge) and judge.name == "vlm:llava:caption"
    assert str(tiny_vlm_folders["llava"].parent) not in judge.name + repr(judge)
    with pytest.raises(JudgeError, match="method must be one of"):
        VLMJudge(str(tiny_vlm_folders["llava"]), method="logits")
    with pytest.raises(JudgeError, match="must contain"):
        VLMJudge(str(tiny_vlm_folders["llava"]), question="Is this right?")


def test_qwen_inputs_keep_mm_token_type_ids(judges, images):
    judge = judges["qwen2_vl", "concepts"]
    inputs = judge._inputs(images[:1], [judge._chat("a cat", with_image=True)])
    assert "mm_token_type_ids" in inputs and int(inputs["mm_token_type_ids"].sum()) > 0


def test_bfloat16_is_close_to_float32(tiny_vlm_folders, judges, images, prompts):
    half = VLMJudge(str(tiny_vlm_folders["qwen2_vl"]), torch_dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    full = judges["qwen2_vl", "concepts"].score(images, prompts)
    assert [fb.overall for fb in half.score(images, prompts)] == pytest.approx(
        [fb.overall for fb in full], abs=0.05
    )
