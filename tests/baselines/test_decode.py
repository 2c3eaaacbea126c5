"""VAE decoding in half precision: float16 upcasts like pipe() does, bfloat16 decodes as is."""

from __future__ import annotations

import copy

import pytest
import torch
from fake_judges import BrightnessJudge

from noisealign.baselines import decode, early_stop_best_of_n, score_and_gradient, upcast_vae
from noisealign.errors import PipelineError
from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts, latent_shape
from noisealign.testing.pipelines import build_tiny_sd_pipeline

PROMPTS = ["a red circle left of a blue square", "two cats on a bench"]
IDS, SEEDS = ["p0", "p1"], [0, 3]


def _half(dtype: torch.dtype):
    pipe = build_tiny_sd_pipeline().to(dtype)
    pipe.vae.register_to_config(force_upcast=True)  # as the SD 1.5 and SDXL VAEs
    return pipe


@pytest.fixture(scope="module")
def fp16_sd():
    return _half(torch.float16)


@pytest.fixture(scope="module")
def bf16_sd():
    return _half(torch.bfloat16)


def _latents(pipe) -> torch.Tensor:
    return batch_noise(IDS, SEEDS, latent_shape(pipe))


def _rounded_fp32_decode(tiny_sd, dtype: torch.dtype, latents: torch.Tensor) -> torch.Tensor:
    """What a float32 decode with the ``dtype``-rounded weights of ``tiny_sd``'s VAE gives."""
    pipe = copy.copy(tiny_sd)  # shallow: only the VAE is replaced
    pipe.vae = copy.deepcopy(tiny_sd.vae).to(dtype).to(torch.float32)
    return decode(pipe, latents)


def test_float16_vae_with_force_upcast_decodes_in_float32_and_stays_float16(fp16_sd, tiny_sd):
    latents = _latents(fp16_sd)
    images = decode(fp16_sd, latents)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()
    assert fp16_sd.vae.dtype == torch.float16
    # the decode ran in float32: bit-equal to a float32 VAE holding the float16-rounded weights
    assert torch.equal(images, _rounded_fp32_decode(tiny_sd, torch.float16, latents))
    # and within float16 weight-rounding of the float32 pipeline's decode
    torch.testing.assert_close(images, decode(tiny_sd, latents), atol=5e-3, rtol=0)


def test_bfloat16_vae_is_not_upcast(bf16_sd, tiny_sd):
    latents = _latents(bf16_sd)
    images = decode(bf16_sd, latents)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert bf16_sd.vae.dtype == torch.bfloat16
    # bfloat16 has float32's range, so diffusers decodes it as is; so do we
    assert not torch.equal(images, _rounded_fp32_decode(tiny_sd, torch.bfloat16, latents))
    torch.testing.assert_close(images, decode(tiny_sd, latents), atol=5e-2, rtol=0)


def test_differentiable_float16_decode_runs_with_its_backward_inside_the_upcast(fp16_sd, tiny_sd):
    latents = _latents(fp16_sd).requires_grad_(True)
    with pytest.raises(PipelineError, match="inside `with upcast_vae\\(pipe\\):`"):
        decode(fp16_sd, latents)
    with upcast_vae(fp16_sd):
        assert fp16_sd.vae.dtype == torch.float32
        (grad,) = torch.autograd.grad(decode(fp16_sd, latents).mean(), latents)
    assert fp16_sd.vae.dtype == torch.float16
    reference = latents.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(decode(tiny_sd, reference).mean(), reference)
    torch.testing.assert_close(grad, expected, atol=2e-5, rtol=0.05)


def test_noise_diffusion_gradient_and_early_stop_run_on_a_float16_pipeline(fp16_sd):
    emb = encode_prompts(fp16_sd, PROMPTS)
    noise = _latents(fp16_sd)
    steps = dict(num_inference_steps=3, guidance_scale=4.0)
    score, grad = score_and_gradient(fp16_sd, emb, PROMPTS, noise, BrightnessJudge(), **steps)
    assert torch.isfinite(score).all() and torch.isfinite(grad).all() and grad.abs().sum() > 0
    candidates = torch.stack([noise, -noise], dim=1)
    out = early_stop_best_of_n(
        fp16_sd, emb, PROMPTS, candidates, BrightnessJudge(), stop_step=2, **steps
    )
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    assert fp16_sd.vae.dtype == torch.float16
