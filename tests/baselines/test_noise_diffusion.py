"""Noise Diffusion: the replay gradient, the step size, the selection rule, the update, the
errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_judges import BrightnessJudge, ScriptedJudge

from noisealign.baselines import (
    decode,
    noise_diffusion,
    score_and_gradient,
    select_candidates,
    step_size,
)
from noisealign.errors import JudgeError
from noisealign.noise import batch_noise, distribution_preserving_mix, initial_noise
from noisealign.pipelines import encode_prompts, generate, latent_shape
from noisealign.pipelines.steps import replay_steps, run_steps

PROMPTS = ["a red circle left of a blue square", "two cats on a bench"]
IDS, SEEDS = ["p0", "p1"], [0, 3]
STEPS = dict(num_inference_steps=3, guidance_scale=4.0)


def test_replay_reproduces_the_forward_pass_and_its_gradient_matches_finite_differences(tiny_pipe):
    emb = encode_prompts(tiny_pipe, PROMPTS)
    noise = batch_noise(IDS, SEEDS, latent_shape(tiny_pipe))
    judge = BrightnessJudge()
    with torch.no_grad():
        trace = run_steps(tiny_pipe, emb, noise, record=True, **STEPS)
    assert len(trace.model_outputs) == 3
    assert torch.equal(
        replay_steps(tiny_pipe, noise, trace.model_outputs, num_inference_steps=3), trace.latents
    )
    score, grad = score_and_gradient(tiny_pipe, emb, PROMPTS, noise, judge, **STEPS)
    assert grad.shape == noise.shape and grad.abs().sum() > 0

    def replayed_score(z: torch.Tensor) -> torch.Tensor:  # eps held fixed, as the paper does
        with torch.no_grad():
            final = replay_steps(tiny_pipe, z, trace.model_outputs, num_inference_steps=3)
            return judge.score_tensor(decode(tiny_pipe, final), PROMPTS).double()

    assert torch.allclose(score, replayed_score(noise).float(), atol=1e-6)
    direction = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    h = 3e-3
    finite = (replayed_score(noise + h * direction) - replayed_score(noise - h * direction)) / (
        2 * h
    )
    analytic = (grad * direction).flatten(1).sum(1).double()
    # decode clamps pixels to [0, 1] as pipe() does; the ~0.5% of tiny-VAE pixels at the clamp
    # put kinks in the score, so the finite difference is off by up to ~2% (measured, SDXL)
    assert torch.allclose(analytic, finite, rtol=0.03, atol=1e-5), (analytic, finite)


def test_step_size_is_one_minus_root_score():
    scores = torch.tensor([0.0, 0.25, 1.0, 1.2, -0.1])
    assert torch.allclose(step_size(scores), torch.tensor([1.0, 0.5, 0.0, 0.0, 1.0]))


def test_selection_is_the_argmax_of_the_projection():
    generator = torch.Generator().manual_seed(0)
    z, grad = (
        torch.randn(3, 4, 8, 8, generator=generator),
        torch.randn(3, 4, 8, 8, generator=generator),
    )
    sigmas = torch.randn(3, 5, 4, 8, 8, generator=generator)
    gamma = torch.tensor([0.9, 0.3, 0.05])
    index, projection = select_candidates(grad, z, sigmas, gamma)
    for b in range(3):
        scores = []
        for i in range(5):
            v = (np.sqrt(1 - gamma[b]) - 1) * z[b] + np.sqrt(gamma[b]) * sigmas[b, i]
            scores.append(float((grad[b] * v).sum() / (v * v).sum()))
        assert np.allclose(projection[b].numpy(), scores, rtol=1e-4)
        assert int(index[b]) == int(np.argmax(scores))


def test_update_preserves_the_unit_variance():
    z = torch.stack([initial_noise(f"z{i}", 0, (4, 64, 64)) for i in range(8)])
    sigma = torch.stack([initial_noise(f"s{i}", 0, (4, 64, 64)) for i in range(8)])
    gamma = step_size(torch.linspace(0, 1, 8)).view(-1, 1, 1, 1)
    updated = distribution_preserving_mix(z, sigma, gamma)
    std = updated.flatten(1).std(1)
    assert torch.allclose(std, torch.ones(8), atol=0.03), std


def test_noise_diffusion_accounting_determinism_and_rounds(tiny_pipe):
    emb = encode_prompts(tiny_pipe, PROMPTS)
    noise = batch_noise(IDS, SEEDS, latent_shape(tiny_pipe))
    kwargs = dict(prompt_ids=IDS, seeds=SEEDS, num_candidates=4, batch_size=1, **STEPS)
    out = noise_diffusion(tiny_pipe, emb, PROMPTS, noise, BrightnessJudge(), rounds=2, **kwargs)
    again = noise_diffusion(tiny_pipe, emb, PROMPTS, noise, BrightnessJudge(), rounds=2, **kwargs)
    assert torch.equal(out.latents, again.latents)
    assert out.denoising_steps == [9.0, 9.0] and out.judge_calls == [2, 2]
    assert [len(v) for v in out.extras["chosen"]] == [2, 2]
    assert np.allclose(out.extras["gammas"], 1 - np.sqrt(out.extras["scores"]), atol=1e-6)
    assert not torch.equal(out.latents, noise)
    # the output latents are the noise its images come from
    full = generate(tiny_pipe, emb, out.latents, **STEPS)
    assert all(
        np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
        for a, b in zip(out.images, full)
    )
    # the first round's update is the selected candidate mixed in with gamma
    first = noise_diffusion(tiny_pipe, emb, PROMPTS, noise, BrightnessJudge(), rounds=1, **kwargs)
    for b in range(2):
        gamma, pick = first.extras["gammas"][b][0], first.extras["chosen"][b][0]
        sigma = initial_noise(
            f"{IDS[b]}/noise-diffusion/round0/candidate{pick}", SEEDS[b], noise.shape[1:]
        )
        expected = distribution_preserving_mix(noise[b], sigma, gamma)
        assert torch.allclose(first.latents[b], expected, atol=1e-5)
    standard = noise_diffusion(
        tiny_pipe, emb, PROMPTS, noise, BrightnessJudge(), rounds=0, **kwargs
    )
    assert torch.equal(standard.latents, noise) and standard.denoising_steps == [3.0, 3.0]


def test_a_judge_without_score_tensor_is_refused(tiny_sd):
    emb = encode_prompts(tiny_sd, PROMPTS)
    noise = batch_noise(IDS, SEEDS, latent_shape(tiny_sd))
    with pytest.raises(JudgeError, match="judge 'scripted' \\(ScriptedJudge\\) has none"):
        noise_diffusion(
            tiny_sd,
            emb,
            PROMPTS,
            noise,
            ScriptedJudge([]),
            prompt_ids=IDS,
            seeds=SEEDS,
            rounds=1,
            num_candidates=2,
            **STEPS,
        )
