"""k-step reward inputs: x_{T-k} is the DDIM trajectory, the x0 solve equals the scheduler's prediction."""

import pytest
import torch
from diffusers import DDIMScheduler

from noisealign.errors import PipelineError
from noisealign.noise import batch_noise
from noisealign.pipelines import denoise_step, encode_prompts
from noisealign.rewards.features import encode_prompt_table, step_features


def test_k0_is_the_noise_and_k2_latent_is_two_ddim_steps(tiny_sd):
    pipe, _ = tiny_sd
    emb = encode_prompts(pipe, ["a red circle", "a blue square"])
    noise = batch_noise(["a", "b"], [0, 1], (4, 16, 16))
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0}
    assert step_features(pipe, noise, emb, steps=0, kind="latent", **kw) is noise
    x = denoise_step(pipe, noise, emb, step_index=0, **kw)
    x = denoise_step(pipe, x, emb, step_index=1, **kw)
    assert torch.equal(step_features(pipe, noise, emb, steps=2, kind="latent", **kw), x)
    with pytest.raises(PipelineError, match="exceeds the schedule's 4 steps"):
        step_features(pipe, noise, emb, steps=5, kind="latent", **kw)


def test_x0_solve_matches_the_schedulers_prediction(tiny_sd):
    pipe, _ = tiny_sd
    emb = encode_prompts(pipe, ["a red circle"])
    noise = batch_noise(["a"], [0], (4, 16, 16))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    x = noise
    with torch.no_grad():  # guidance 1: one UNet pass on the prompt, as denoise_step does
        for t in scheduler.timesteps[:2]:
            eps = pipe.unet(x, t, encoder_hidden_states=emb.embeds).sample
            step = scheduler.step(eps, t, x)
            x = step.prev_sample
    ours = step_features(
        pipe, noise, emb, steps=2, kind="x0", num_inference_steps=10, guidance_scale=1.0
    )
    assert torch.allclose(ours, step.pred_original_sample, atol=1e-3, rtol=1e-3)


def test_prompt_table_matches_batched_encoding(tiny_sdxl):
    pipe, _ = tiny_sdxl
    prompts = ["a red circle", "a blue square", "a green star"]
    table = encode_prompt_table(pipe, prompts, batch_size=2)
    emb = encode_prompts(pipe, prompts)
    assert torch.allclose(table.embeds, emb.embeds, atol=1e-6)
    assert torch.allclose(table.pooled, emb.pooled, atol=1e-6)
    assert table.tokens == emb.tokens
