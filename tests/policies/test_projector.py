"""NoiseProjector: identity at init, shapes for SD and SDXL, per-sample conditioning, Gaussianity."""

import pytest
import torch

from noisealign.errors import ConfigError, PipelineError
from noisealign.noise import gaussian_stats
from noisealign.policies import (
    NoiseProjector,
    NoiseProjectorConfig,
    apply_policy,
    count_parameters,
    load_projector,
)
from noisealign.policies.projector import moment_match


def tiny(**kw):
    torch.manual_seed(0)
    fields = dict(latent_channels=4, text_dim=32, hidden_dim=32, depth=1, num_heads=2, patch_size=2)
    return NoiseProjector(NoiseProjectorConfig(**{**fields, **kw}))


def perturbed(model, scale=0.05):
    """The projector after its zero head got random weights, as if trained a little."""
    with torch.no_grad():
        model.head.weight.normal_(0, scale)
    return model.eval()


@pytest.mark.parametrize("size", [(16, 16), (15, 9)])
def test_identity_at_initialisation_bit_for_bit(size):
    noise = torch.randn(3, 4, *size)
    out = tiny()(noise, torch.randn(3, 5, 32), torch.ones(3, 5, dtype=torch.bool))
    assert torch.equal(out, noise)


def test_sd15_default_size_is_under_three_million_parameters():
    assert count_parameters(NoiseProjector(NoiseProjectorConfig())) <= 3_000_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes_sd_and_sdxl(dtype):
    sd = perturbed(tiny())
    out = sd(torch.randn(2, 4, 12, 20, dtype=dtype), torch.randn(2, 6, 32, dtype=dtype))
    assert out.shape == (2, 4, 12, 20) and out.dtype == dtype
    xl = perturbed(tiny(text_dim=64, pooled_dim=32, latent_channels=8))
    out = xl(torch.randn(2, 8, 16, 16), torch.randn(2, 6, 64), pooled=torch.randn(2, 32))
    assert out.shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="needs pooled"):
        xl(torch.randn(2, 8, 16, 16), torch.randn(2, 6, 64))
    with pytest.raises(ValueError, match="embeds must be"):
        sd(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 31))


def test_per_sample_conditioning_and_padding_mask():
    model = perturbed(tiny())
    noise = torch.randn(1, 4, 16, 16).expand(2, -1, -1, -1)
    embeds = torch.randn(2, 5, 32)
    out = model(noise, embeds)
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # same noise, two prompts
    alone = model(noise[:1], embeds[1:])
    assert torch.allclose(out[1], alone[0], atol=1e-5)  # sample 1 depends on its own prompt only
    mask = torch.tensor([[True, True, True, False, False]])
    changed = embeds[:1].clone()
    changed[:, 3:] = 100.0  # padding tokens are ignored
    assert torch.allclose(
        model(noise[:1], embeds[:1], mask), model(noise[:1], changed, mask), atol=1e-5
    )


def test_deterministic_in_eval_and_moment_matched():
    model = perturbed(tiny(), scale=0.5)
    noise, embeds = torch.randn(4, 4, 32, 32), torch.randn(4, 5, 32)
    out = model(noise, embeds)
    assert torch.equal(out, model(noise, embeds))
    assert not torch.allclose(out, noise, atol=1e-2)
    stats, before = gaussian_stats(out), gaussian_stats(noise)
    assert torch.allclose(stats.mean, before.mean, atol=1e-5)
    assert torch.allclose(stats.std, before.std, atol=1e-4)
    assert bool(stats.is_gaussian(ks_tol=0.1).all())


def test_bad_config_fails_with_the_field_name():
    with pytest.raises(ConfigError, match="'hidden_dim'"):
        NoiseProjectorConfig(hidden_dim=30, num_heads=4)
    with pytest.raises(ConfigError, match="'residual_scale' must be >= 0, got -1"):
        NoiseProjectorConfig(residual_scale=-1.0)


def test_residual_scale_multiplies_the_residual_before_the_moment_match():
    model = perturbed(tiny(), scale=0.5)
    noise, embeds = torch.randn(3, 4, 16, 16), torch.randn(3, 5, 32)
    r = model.residual(noise, embeds, torch.ones(3, 5, dtype=torch.bool))
    assert torch.equal(model(noise, embeds), moment_match(noise, r))
    model.config.residual_scale = 2.5
    scaled = model(noise, embeds)
    assert torch.allclose(scaled, moment_match(noise, 2.5 * r), atol=1e-6)
    assert not torch.allclose(scaled, moment_match(noise, r), atol=1e-2)
    assert torch.allclose(gaussian_stats(scaled).std, gaussian_stats(noise).std, atol=1e-4)
    model.config.residual_scale = 0.0
    assert torch.allclose(model(noise, embeds), noise, atol=1e-6)  # s = 0: ε itself


def test_save_load_round_trip_and_pipeline_check(tmp_path):
    from noisealign.pipelines import pipeline_signature
    from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    sd, sdxl = build_tiny_sd_pipeline(), build_tiny_sdxl_pipeline()
    model = perturbed(tiny(pipeline_signature=pipeline_signature(sd)))
    model.save_pretrained(tmp_path / "p")
    loaded = load_projector(str(tmp_path / "p"), sd)
    noise, embeds = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    assert torch.equal(loaded(noise, embeds), model(noise, embeds))
    with pytest.raises(PipelineError, match="text_embed_dim: expected 32, got 64"):
        load_projector(str(tmp_path / "p"), sdxl)
    prompts = ["a red circle", "a blue square"]
    projected, standard = apply_policy(sd, loaded, prompts, [0, 1], return_standard=True)
    assert projected.shape == standard.shape == (2, 4, 16, 16)
    assert not torch.allclose(projected, standard)
    assert torch.equal(apply_policy(sd, loaded, prompts, [0, 1]), projected)  # deterministic
    images = sd(prompts, latents=projected, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 32, 32, 3)
