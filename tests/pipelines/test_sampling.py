import pytest
import torch

from noisealign.noise import batch_noise
from noisealign.pipelines import (
    denoise_step,
    encode_prompts,
    generate,
    inversion_step,
    latent_shape,
    re_denoise,
)

PROMPTS = ["a red circle left of a blue square", "two cats on a bench"]
STEPS = dict(num_inference_steps=3, guidance_scale=4.0)


def _noise(pipe, n=2):
    return batch_noise([f"p{i}" for i in range(n)], [0] * n, latent_shape(pipe))


def test_latent_shape(tiny_pipe):
    assert latent_shape(tiny_pipe) == (4, 16, 16)
    assert latent_shape(tiny_pipe, 64, 48) == (4, 32, 24)
    with pytest.raises(ValueError, match="multiples of the VAE scale factor 2"):
        latent_shape(tiny_pipe, 33, 32)


def test_generate_matches_pipeline_call(tiny_pipe):
    """generate() conditions exactly like pipe(prompt), negative branch included."""
    noise = _noise(tiny_pipe, 1)
    ours = generate(
        tiny_pipe, encode_prompts(tiny_pipe, PROMPTS[:1]), noise, output_type="pt", **STEPS
    )
    theirs = tiny_pipe(PROMPTS[0], latents=noise, output_type="pt", **STEPS).images
    assert ours.shape == (1, 3, 32, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


def test_generate_is_deterministic_and_batch_invariant(tiny_pipe):
    emb, noise = encode_prompts(tiny_pipe, PROMPTS), _noise(tiny_pipe)
    first = generate(tiny_pipe, emb, noise, output_type="pt", **STEPS)
    again = generate(tiny_pipe, emb, noise, output_type="pt", **STEPS)
    assert torch.equal(first, again)
    assert 0.0 <= first.min() and first.max() <= 1.0
    singles = torch.cat(
        [
            generate(tiny_pipe, emb.select([i]), noise[i : i + 1], output_type="pt", **STEPS)
            for i in range(2)
        ]
    )
    # measured max difference 9e-7 (batched vs. single matmuls); 1e-5 leaves room for other CPUs
    assert (singles - first).abs().max() < 1e-5


def test_different_latents_give_different_images(tiny_sd):
    emb = encode_prompts(tiny_sd, PROMPTS[:1] * 2)
    images = generate(tiny_sd, emb, _noise(tiny_sd), output_type="pt", **STEPS)
    assert (images[0] - images[1]).abs().mean() > 1e-3


def test_generate_pil(tiny_sd):
    images = generate(tiny_sd, encode_prompts(tiny_sd, PROMPTS), _noise(tiny_sd), **STEPS)
    assert len(images) == 2 and images[0].size == (32, 32) and images[0].mode == "RGB"


def test_generate_rejects_bad_latents(tiny_sd):
    emb = encode_prompts(tiny_sd, PROMPTS)
    noise = _noise(tiny_sd)
    noise[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latents contains NaN or Inf"):
        generate(tiny_sd, emb, noise, **STEPS)
    with pytest.raises(
        ValueError,
        match=r"latents have shape \(3, 16, 16\) per sample but the pipeline expects \(4, 16, 16\)",
    ):
        generate(tiny_sd, emb, torch.zeros(2, 3, 16, 16), **STEPS)
    with pytest.raises(
        ValueError, match=r"shape \(4, 16, 16\) per sample but the pipeline expects \(4, 32, 32\)"
    ):
        generate(tiny_sd, emb, torch.zeros(2, 4, 16, 16), height=64, width=64, **STEPS)
    with pytest.raises(ValueError, match="got 1 latents for 2 prompt embeddings"):
        generate(tiny_sd, emb, torch.zeros(1, 4, 16, 16), **STEPS)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_inversion_undoes_denoise_step(tiny_pipe, guidance):
    emb, noise = encode_prompts(tiny_pipe, PROMPTS), _noise(tiny_pipe)
    kwargs = dict(num_inference_steps=50, guidance_scale=guidance, step_index=0)
    stepped = denoise_step(tiny_pipe, noise, emb, **kwargs)
    back = inversion_step(tiny_pipe, stepped, emb, **kwargs)
    assert back.shape == noise.shape and back.dtype == noise.dtype
    moved, error = (stepped - noise).abs().max(), (back - noise).abs().max()
    # measured: the step moves latents by ~0.47 (max), the round trip misses by <= 0.02
    assert moved > 0.2
    assert error < 0.05


def test_re_denoise_changes_noise_with_prompt(tiny_sd):
    emb, noise = encode_prompts(tiny_sd, PROMPTS), _noise(tiny_sd)
    golden = re_denoise(tiny_sd, noise, emb, num_inference_steps=10)
    assert golden.shape == noise.shape and torch.isfinite(golden).all()
    assert (golden - noise).abs().mean() > 1e-3
    other = re_denoise(
        tiny_sd, noise, encode_prompts(tiny_sd, PROMPTS[::-1]), num_inference_steps=10
    )
    assert not torch.allclose(golden, other)


def test_step_index_out_of_range(tiny_sd):
    emb, noise = encode_prompts(tiny_sd, PROMPTS), _noise(tiny_sd)
    with pytest.raises(ValueError, match=r"step_index 10 is outside \[0, 10\)"):
        denoise_step(tiny_sd, noise, emb, num_inference_steps=10, guidance_scale=1.0, step_index=10)
