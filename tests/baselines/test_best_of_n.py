"""Best-of-N and early-stop best-of-N on tiny pipelines, with judges whose scores we control."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_judges import BrightnessJudge, ScriptedJudge

from noisealign.baselines import (
    LinearPreview,
    best_of_n,
    candidate_noise,
    decode,
    early_stop_best_of_n,
    linear_preview,
)
from noisealign.noise import batch_noise, initial_noise
from noisealign.pipelines import encode_prompts, generate, latent_shape
from noisealign.pipelines.steps import run_steps

PROMPTS = ["a red circle left of a blue square", "two cats on a bench"]
IDS, SEEDS = ["p0", "p1"], [0, 3]
STEPS = dict(num_inference_steps=4, guidance_scale=4.0)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_candidate_zero_is_the_standard_noise():
    cands = candidate_noise(IDS, SEEDS, 3, (4, 8, 8))
    assert cands.shape == (2, 3, 4, 8, 8) and cands.dtype == torch.float32
    assert torch.equal(cands[:, 0], batch_noise(IDS, SEEDS, (4, 8, 8)))
    assert torch.equal(cands[1, 2], initial_noise("p1/candidate2", 3, (4, 8, 8)))
    assert torch.equal(cands, candidate_noise(IDS, SEEDS, 3, (4, 8, 8)))
    assert not torch.equal(cands[0, 1], cands[0, 2])
    with pytest.raises(ValueError, match="at least one candidate"):
        candidate_noise(IDS, SEEDS, 0, (4, 8, 8))


def test_best_of_one_is_the_standard_method(tiny_pipe):
    emb = encode_prompts(tiny_pipe, PROMPTS)
    cands = candidate_noise(IDS, SEEDS, 1, latent_shape(tiny_pipe))
    judge = ScriptedJudge([])
    out = best_of_n(tiny_pipe, emb, PROMPTS, cands, judge, **STEPS)
    plain = generate(tiny_pipe, emb, cands[:, 0], **STEPS)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(out.images, plain))
    assert torch.equal(out.latents, cands[:, 0])
    # one candidate: nothing to choose, so no judge call
    assert out.denoising_steps == [4.0, 4.0] and out.judge_calls == [0, 0] and not judge.seen


def test_best_of_n_keeps_the_argmax_and_breaks_ties_low(tiny_sd):
    emb = encode_prompts(tiny_sd, PROMPTS)
    cands = candidate_noise(IDS, SEEDS, 3, latent_shape(tiny_sd))
    # prompt-major order: prompt 0's candidates 0..2, then prompt 1's; 1 and 2 tie for prompt 1
    judge = ScriptedJudge([0.2, 0.9, 0.5, 0.1, 0.7, 0.7])
    out = best_of_n(tiny_sd, emb, PROMPTS, cands, judge, batch_size=4, **STEPS)
    assert out.extras["chosen"] == [1, 1]
    assert out.extras["scores"] == [[0.2, 0.9, 0.5], [0.1, 0.7, 0.7]]
    assert torch.equal(out.latents, torch.stack([cands[0, 1], cands[1, 1]]))
    expected = generate(tiny_sd, emb, out.latents, **STEPS)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(out.images, expected))
    assert [p for _, p in judge.seen] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert out.denoising_steps == [12.0, 12.0] and out.judge_calls == [3, 3]


def test_early_stop_finishes_the_best_preview(tiny_pipe):
    emb = encode_prompts(tiny_pipe, PROMPTS)
    cands = candidate_noise(IDS, SEEDS, 3, latent_shape(tiny_pipe))
    judge = BrightnessJudge()
    out = early_stop_best_of_n(
        tiny_pipe, emb, PROMPTS, cands, judge, stop_step=2, batch_size=4, **STEPS
    )
    # the previews, recomputed independently: VAE decode of the predicted x0 after 2 steps
    flat = cands.flatten(0, 1)
    trace = run_steps(tiny_pipe, emb.select([0, 0, 0, 1, 1, 1]), flat, stop=2, **STEPS)
    previews = judge.score_tensor(decode(tiny_pipe, trace.pred_x0), PROMPTS).view(2, 3)
    assert out.extras["chosen"] == previews.argmax(1).tolist()
    assert np.allclose(out.extras["scores"], previews.detach().numpy(), atol=0.02)
    chosen = torch.stack([cands[b, c] for b, c in enumerate(out.extras["chosen"])])
    assert torch.equal(out.latents, chosen)
    full = generate(tiny_pipe, emb, chosen, **STEPS)
    for ours, theirs in zip(out.images, full):
        # measured: identical or off by one grey level (float reassociation in the UNet batch)
        assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1
    assert out.denoising_steps == [3 * 2 + 4 - 2] * 2 and out.judge_calls == [3, 3]


def test_early_stop_at_the_last_step_and_errors(tiny_sd):
    emb = encode_prompts(tiny_sd, PROMPTS)
    cands = candidate_noise(IDS, SEEDS, 2, latent_shape(tiny_sd))
    out = early_stop_best_of_n(
        tiny_sd, emb, PROMPTS, cands, ScriptedJudge([0, 1, 1, 0]), stop_step=4, **STEPS
    )
    assert out.extras["chosen"] == [1, 0] and out.denoising_steps == [8.0, 8.0]
    full = generate(tiny_sd, emb, out.latents, **STEPS)
    assert all(np.abs(_pixels(a) - _pixels(b)).max() <= 1 for a, b in zip(out.images, full))
    with pytest.raises(ValueError, match=r"stop_step must lie in \[1, 4\], got 0"):
        early_stop_best_of_n(tiny_sd, emb, PROMPTS, cands, ScriptedJudge([]), stop_step=0, **STEPS)
    with pytest.raises(ValueError, match="preview must be one of"):
        early_stop_best_of_n(
            tiny_sd, emb, PROMPTS, cands, ScriptedJudge([]), stop_step=1, preview="clip", **STEPS
        )
    with pytest.raises(ValueError, match="got 2 prompts, 2 prompt embeddings and 1 candidate"):
        best_of_n(tiny_sd, emb, PROMPTS, cands[:1], ScriptedJudge([]), **STEPS)


def test_linear_preview_is_fitted_once_and_approximates_the_vae(tiny_sd):
    preview = linear_preview(tiny_sd)
    assert isinstance(preview, LinearPreview) and linear_preview(tiny_sd) is preview
    assert preview.weight.shape == (4, 3) and preview.bias.shape == (3,)
    assert preview.size == (32, 32)
    latents = run_steps(
        tiny_sd,
        encode_prompts(tiny_sd, [""] * 2),
        batch_noise(["x", "y"], [0, 0], (4, 16, 16)),
        num_inference_steps=4,
        guidance_scale=1.0,
    ).latents
    with torch.no_grad():
        exact = decode(tiny_sd, latents)
    approx = preview(latents)
    assert approx.shape == exact.shape and 0 <= approx.min() and approx.max() <= 1
    # a least-squares fit beats the best constant image
    assert (approx - exact).pow(2).mean() < (exact - exact.mean((0, 2, 3), keepdim=True)).pow(
        2
    ).mean()
    emb = encode_prompts(tiny_sd, PROMPTS)
    cands = candidate_noise(IDS, SEEDS, 2, latent_shape(tiny_sd))
    out = early_stop_best_of_n(
        tiny_sd,
        emb,
        PROMPTS,
        cands,
        ScriptedJudge([0, 1, 0, 1]),
        stop_step=1,
        preview="linear",
        **STEPS,
    )
    assert out.extras["chosen"] == [1, 1] and out.denoising_steps == [5.0, 5.0]
