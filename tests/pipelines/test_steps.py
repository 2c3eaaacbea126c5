"""The hand-written steps of noisealign.pipelines.steps on every family: the same schedule and
latents as pipe(), x̂0, inversion, the k-step reward inputs through pipe()'s callback, and the
methods built on them (NPD re-denoise, early-stop best-of-N, the Noise Diffusion replay) on the
flow-matching SD3 and FLUX replicas."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from noisealign.baselines import candidate_noise, early_stop_best_of_n, score_and_gradient
from noisealign.noise import batch_noise
from noisealign.pipelines import (
    denoise_step,
    encode_prompts,
    generate,
    inversion_step,
    latent_shape,
    re_denoise,
)
from noisealign.pipelines.sampling import pipeline_latents
from noisealign.pipelines.schedulers import stepping_sampler
from noisealign.pipelines.steps import (
    guided_output,
    invert,
    replay_steps,
    run_steps,
    schedule,
    step,
    x0_between,
)
from noisealign.rewards.features import step_features
from noisealign.testing.flow_pipelines import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from noisealign.testing.pipelines import build_tiny_sd_pipeline

sys.path.insert(0, str(Path(__file__).parents[1] / "baselines"))
from fake_judges import BrightnessJudge  # noqa: E402

PROMPTS = ["a red circle left of a blue square", "a cat"]
BUILDERS = {
    "sd": build_tiny_sd_pipeline,
    "sd3": build_tiny_sd3_pipeline,
    "flux-dev": build_tiny_flux_pipeline,
    "flux-schnell": lambda: build_tiny_flux_pipeline(guidance_embeds=False),
}
FLOW = ("sd3", "flux-dev", "flux-schnell")


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    """``(name, pipe)``; the pipelines are shared within the module: do not mutate them."""
    pipe = BUILDERS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


@pytest.fixture(scope="module", params=FLOW)
def flow(request):
    pipe = BUILDERS[request.param]()
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def _noise(pipe, n=2):
    # 32-pixel images: the FLUX replica's own default (128 latents) is too big for a test
    return batch_noise([f"p{i}" for i in range(n)], list(range(n)), latent_shape(pipe, 32, 32))


def _steps(name):
    return dict(num_inference_steps=3, guidance_scale=1.0 if name == "flux-schnell" else 4.0)


def test_the_schedule_and_the_latents_are_the_ones_pipe_runs(family):
    name, pipe = family
    emb, noise, kw = encode_prompts(pipe, PROMPTS), _noise(pipe), _steps(name)
    seen = pipeline_latents(pipe, emb, noise, steps_run=3, **kw)
    with torch.no_grad():
        generate(pipe, emb, noise, output_type="pt", **kw)  # (for the timesteps only)
    pipe_timesteps = [float(t) for t in pipe.scheduler.timesteps]
    sched = schedule(pipe, 3, noise.shape[2:])
    assert [float(t) for t in sched.timesteps] == pipe_timesteps
    if name in ("sd3", "flux-dev"):  # shifted schedules (schnell: shift 1): not a linspace
        assert not np.allclose(sched.scheduler.sigmas[:-1], np.linspace(1, 1 / 3, 3))
    trace = run_steps(pipe, emb, noise, record=True, **kw)
    assert len(seen) == 3 and seen[-1].shape == noise.shape
    # the hand-written loop and pipe() give the same final latents (float32 rounding apart)
    torch.testing.assert_close(trace.latents, seen[-1].float(), atol=1e-5, rtol=1e-5)


def test_x0_and_the_inverse_step_follow_from_one_model_output(family):
    name, pipe = family
    emb, noise, kw = encode_prompts(pipe, PROMPTS), _noise(pipe), _steps(name)
    sched = schedule(pipe, kw["num_inference_steps"], noise.shape[2:])
    out = guided_output(pipe, noise, emb, sched.timesteps[0], kw["guidance_scale"])
    x_next, x0 = step(sched, out, 0, noise)
    assert (x_next - noise).abs().max() > 1e-3
    # what a pipe() callback sees (input and output of the step) gives the same x̂0
    torch.testing.assert_close(x0_between(sched, 0, noise, x_next), x0, atol=1e-4, rtol=1e-4)
    # the inverse step with the same output lands back where the step started
    torch.testing.assert_close(invert(sched, out, 0, x_next), noise, atol=1e-4, rtol=1e-4)
    if name in FLOW:  # x̂0 = x_t − σ_t·v at σ_0 = 1
        torch.testing.assert_close(x0, noise - out)


def test_inversion_nearly_undoes_a_flow_step_and_re_denoise_follows_the_prompt(flow):
    name, pipe = flow
    emb, noise = encode_prompts(pipe, PROMPTS), _noise(pipe)
    kw = dict(num_inference_steps=10, guidance_scale=1.0, step_index=0)
    stepped = denoise_step(pipe, noise, emb, **kw)
    back = inversion_step(pipe, stepped, emb, **kw)
    assert back.shape == noise.shape and back.dtype == noise.dtype
    # the round trip misses only by where v is evaluated (x_1 instead of x_0)
    assert (back - noise).abs().max() < 0.2 * (stepped - noise).abs().max()
    golden = re_denoise(pipe, noise, emb, num_inference_steps=10, guidance_denoise=4.0)
    assert torch.isfinite(golden).all() and (golden - noise).abs().mean() > 1e-4
    other = re_denoise(
        pipe, noise, encode_prompts(pipe, PROMPTS[::-1]), num_inference_steps=10,
        guidance_denoise=4.0,
    )  # fmt: skip
    assert not torch.allclose(golden, other)


def test_k_step_reward_inputs_run_the_family_sampler_through_pipe(family):
    name, pipe = family
    emb, noise, kw = encode_prompts(pipe, PROMPTS), _noise(pipe), _steps(name)
    trace = run_steps(pipe, emb, noise, stop=2, **kw)
    latent = step_features(pipe, noise, emb, steps=2, kind="latent", **kw)
    x0 = step_features(pipe, noise, emb, steps=2, kind="x0", **kw)
    assert latent.shape == x0.shape == noise.shape and latent.dtype == noise.dtype
    torch.testing.assert_close(latent, trace.latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x0, trace.pred_x0, atol=1e-4, rtol=1e-4)
    if name == "sd":  # whatever sampler the pipeline holds, the features are DDIM's
        held = pipe.scheduler
        pipe.scheduler = EulerDiscreteScheduler.from_config(held.config)
        try:
            assert torch.equal(step_features(pipe, noise, emb, steps=2, kind="x0", **kw), x0)
            with stepping_sampler(pipe):
                assert type(pipe.scheduler).__name__ == "DDIMScheduler"
            assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
        finally:
            pipe.scheduler = held


def test_early_stop_on_a_flow_model_finishes_the_image_pipe_gives(flow):
    name, pipe = flow
    emb, kw = encode_prompts(pipe, PROMPTS), _steps(name)
    cands = candidate_noise(["p0", "p1"], [0, 1], 2, latent_shape(pipe, 32, 32))
    judge = BrightnessJudge()
    out = early_stop_best_of_n(pipe, emb, PROMPTS, cands, judge, stop_step=1, **kw)
    chosen = torch.stack([cands[b, c] for b, c in enumerate(out.extras["chosen"])])
    assert torch.equal(out.latents, chosen)
    full = generate(pipe, emb, chosen, **kw)
    for ours, theirs in zip(out.images, full):
        # the VAE decode with SD3 / FLUX's shift_factor, and the same steps as pipe()
        diff = np.abs(np.asarray(ours, np.int16) - np.asarray(theirs, np.int16))
        assert diff.max() <= 1
    assert out.denoising_steps == [2 * 1 + 3 - 1] * 2


def test_the_noise_diffusion_replay_on_a_flow_model(flow):
    name, pipe = flow
    emb, noise, kw = encode_prompts(pipe, PROMPTS), _noise(pipe), _steps(name)
    trace = run_steps(pipe, emb, noise, record=True, **kw)
    replayed = replay_steps(pipe, noise, trace.model_outputs, num_inference_steps=3)
    assert torch.equal(replayed, trace.latents)
    score, grad = score_and_gradient(pipe, emb, PROMPTS, noise, BrightnessJudge(), **kw)
    assert score.shape == (2,) and grad.shape == noise.shape and grad.abs().sum() > 0
    # with the velocities fixed, Euler is a translation: moving z moves the final latents as much
    shifted = replay_steps(pipe, noise + 0.1, trace.model_outputs, num_inference_steps=3)
    torch.testing.assert_close(shifted - replayed, torch.full_like(noise, 0.1))
