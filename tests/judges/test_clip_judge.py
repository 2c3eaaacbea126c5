"""CLIPJudge: CLIPScore values, PIL and tensor paths agree, gradients reach the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from noisealign.judges import build_judge, split_concepts
from noisealign.judges.clip import CLIPJudge
from noisealign.testing.vlms import WORDS

# Measured: the PIL path (uint8 rounding, PIL's bicubic) and the torch path (antialiased
# bicubic on floats) differ by at most 0.0044 in score on noisy images of odd sizes.
PIL_VS_TENSOR_ATOL = 0.01


@pytest.fixture(scope="module")
def judge(tiny_clip_folder) -> CLIPJudge:
    return CLIPJudge(str(tiny_clip_folder))


def _as_tensor(images) -> torch.Tensor:
    return torch.stack(
        [
            torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
            for im in images
        ]
    )


def test_score_is_clipped_scaled_cosine(judge, images, prompts):
    feedback = judge.score(images, prompts)
    assert judge.name == "clip:clip" and len(feedback) == len(prompts)
    for image, prompt, fb in zip(images, prompts, feedback):
        pixels = judge.image_processor([image], return_tensors="pt")["pixel_values"]
        tokens = judge.tokenizer(
            [prompt, *[c.text for c in split_concepts(prompt)]], padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            image_emb = F.normalize(
                judge.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1
            )
            text_emb = F.normalize(judge.model.get_text_features(**tokens).pooler_output, dim=-1)
        expected = (2.5 * (text_emb @ image_emb[0])).clamp(0, 1).tolist()
        assert fb.overall == pytest.approx(expected[0], abs=1e-5)
        assert [c.score for c in fb.concepts] == pytest.approx(expected[1:], abs=1e-5)
        assert fb.part_scores() == [(s, e, c.score) for c in fb.concepts for s, e in c.spans]


def test_score_tensor_agrees_with_score(judge, images, prompts):
    texts = [*prompts, *WORDS]  # a random CLIP scores many texts 0: compare on many
    inside = 0
    for image in images:  # one at a time: the images differ in size
        from_pil = torch.tensor(
            [fb.overall for fb in judge.score([image] * len(texts), texts, [[]] * len(texts))]
        )
        from_tensor = judge.score_tensor(_as_tensor([image]).expand(len(texts), -1, -1, -1), texts)
        assert from_tensor.tolist() == pytest.approx(from_pil.tolist(), abs=PIL_VS_TENSOR_ATOL)
        inside += int(((from_pil > 0) & (from_pil < 1)).sum())
    assert inside >= 10


def test_score_tensor_is_differentiable(judge, images):
    pixels = _as_tensor(images[:1]).requires_grad_(True)
    with torch.no_grad():
        scores = judge.score_tensor(pixels.expand(len(WORDS), -1, -1, -1), WORDS)
    text = WORDS[int(torch.argmin((scores - 0.5).abs()))]
    score = judge.score_tensor(pixels, [text])
    assert 0.0 < score.item() < 1.0  # inside the clamp, so the gradient is the cosine's
    score.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.model.parameters())


def test_batch_equals_single(judge, images, prompts):
    same_size = [images[0], images[2].resize(images[0].size)] * 2
    texts = prompts[:2] * 2
    batched = judge.score(same_size, texts)
    tensor = judge.score_tensor(_as_tensor(same_size), texts)
    for i, (image, text) in enumerate(zip(same_size, texts)):
        assert judge.score([image], [text])[0].overall == pytest.approx(
            batched[i].overall, abs=1e-5
        )
        assert judge.score_tensor(_as_tensor([image]), [text]).item() == pytest.approx(
            tensor[i].item(), abs=1e-5
        )


def test_registry_and_scale(tiny_clip_folder, images, prompts):
    strict = build_judge("clip", model=str(tiny_clip_folder), scale=100.0)
    loose = CLIPJudge(str(tiny_clip_folder), scale=0.01)
    assert all(fb.overall < 0.01 for fb in loose.score(images, prompts))
    texts = list(WORDS)
    strict_scores = strict.score([images[0]] * len(texts), texts, [[]] * len(texts))
    # both signs of the cosine occur, and a large scale saturates most scores at 0 or 1
    overall = [fb.overall for fb in strict_scores]
    assert 0.0 in overall and 1.0 in overall and sum(0 < s < 1 for s in overall) < len(overall) / 4
