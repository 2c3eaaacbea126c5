"""The shapes judge's smooth surrogate (score_tensor): tracks the verdict, has useful gradients."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from noisealign.baselines import DifferentiableJudge
from noisealign.toy.grammar import all_prompts
from noisealign.toy.judge import ShapesJudge
from noisealign.toy.render import render_prompt


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images]
    )


@pytest.fixture(scope="module")
def scored(renders) -> tuple[list[Image.Image], list[str]]:
    """200 renders with their own prompt, then the same images with a random (mostly wrong) one."""
    rng = random.Random(7)
    images = [im for _, im in renders[:200]]
    prompts = [p for p, _ in renders[:200]] + [rng.choice(all_prompts()) for _ in range(200)]
    return images + images, prompts


def test_the_shapes_judge_is_differentiable(judge):
    assert isinstance(judge, DifferentiableJudge)


@pytest.mark.parametrize("blur", [0.0, 0.8])
def test_surrogate_tracks_the_verdict(judge, scored, blur):
    images, prompts = scored
    if blur:  # softer edges, like the toy VAE's decodes
        images = [im.filter(ImageFilter.GaussianBlur(blur)) for im in images]
    hard = np.array([f.overall for f in judge.score(images, prompts)])
    soft = judge.score_tensor(_tensor(images), prompts).numpy()
    assert soft.shape == (400,) and soft.min() >= 0 and soft.max() <= 1
    assert 0.3 < hard.mean() < 0.8  # both verdicts are well represented
    # measured: Pearson 0.9997 crisp; on 152 toy-model images 0.92 (docstring of the surrogate)
    assert np.corrcoef(hard, soft)[0, 1] > 0.9
    assert np.mean((soft > 0.5) == (hard == 1)) > 0.95


def test_fraction_mode_tracks_the_fraction_verdict(scored):
    judge = ShapesJudge(overall="fraction")
    images, prompts = scored
    hard = np.array([f.overall for f in judge.score(images, prompts)])
    soft = judge.score_tensor(_tensor(images), prompts).numpy()
    assert np.corrcoef(hard, soft)[0, 1] > 0.9


def test_gradients_are_finite_and_nonzero(judge):
    rng = random.Random(3)
    prompt = "a red circle left of a blue square"
    images = [render_prompt(prompt, rng) for _ in range(2)]
    # the second image judged against the converse relation: wrong, but close to right
    prompts = [prompt, "a red circle right of a blue square"]
    pixels = _tensor(images).requires_grad_(True)
    score = judge.score_tensor(pixels, prompts)
    assert score[0] > 0.8 and score[1] < 0.1
    (grad,) = torch.autograd.grad(score.sum(), pixels)
    assert torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).all()
    # moving the wrong image's pixels along the gradient raises its score
    with torch.no_grad():
        nudged = judge.score_tensor((pixels + 0.05 * grad.sign()).clamp(0, 1), prompts)
    assert nudged[1] > score[1]


def test_score_tensor_checks_batch_sizes(judge):
    with pytest.raises(ValueError, match="got 1 images but 2 prompts"):
        judge.score_tensor(torch.zeros(1, 3, 32, 32), ["a red circle", "a blue square"])
