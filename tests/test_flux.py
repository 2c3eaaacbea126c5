"""FLUX on tiny random replicas of its real classes (a guidance-distilled "dev" one and a
timestep-distilled "schnell" one): loading, the T5 prompt encoding with offsets, packing the
latents, policies on 16-channel latents, generate, and what is refused."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from PIL import Image
from transformers import CLIPTextModel, T5EncoderModel

from noisealign import generate as generate_stage
from noisealign.errors import ConfigError, PipelineError
from noisealign.noise import batch_noise
from noisealign.pipelines import (
    encode_prompts,
    generate,
    latent_shape,
    load_pipeline,
    negative_embeddings,
    pipeline_signature,
)
from noisealign.pipelines.adapters import adapter_for
from noisealign.pipelines.flux import pack_latents, unpack_latents
from noisealign.policies import apply_policy, load_policy
from noisealign.policies.pair_training import build_policy
from noisealign.testing.flow_pipelines import build_tiny_flux_pipeline
from noisealign.testing.pipelines import build_tiny_sd_pipeline

PROMPTS = ["a red circle left of a blue square", "a cat"]
STEPS = dict(num_inference_steps=3, guidance_scale=3.5)
SIZE = dict(height=32, width=32)  # pipe(prompt)'s default is 128x128 latents, too big for a test
T5_LENGTH, WIDTH, POOLED = 512, 96, 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """``dev`` and ``schnell`` (the tiny FLUX pipelines) and an SD-shaped projector."""
    root = tmp_path_factory.mktemp("flux")
    build_tiny_flux_pipeline(root / "dev")
    build_tiny_flux_pipeline(root / "schnell", guidance_embeds=False)
    sd = build_tiny_sd_pipeline(root / "sd")
    policy_for(sd, root / "sd", "noise_projector").save_pretrained(root / "sd_projector")
    return root


@pytest.fixture(scope="module")
def pipe(root):
    """The dev replica, shared across tests: do not mutate."""
    return load_pipeline(str(root / "dev"))


@pytest.fixture(scope="module")
def schnell(root):
    return load_pipeline(str(root / "schnell"))


def policy_for(pipe, folder, policy_type):
    """A policy built by the project's factory from the pipeline's signature, its zero-initialised
    weights drawn as if trained (a fresh one is the identity map)."""
    config = SimpleNamespace(
        policy_type=policy_type,
        policy_kwargs={"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2},
        pipeline=str(folder),
        seed=0,
    )
    policy = build_policy(config, pipeline_signature(pipe), latent_shape(pipe, **SIZE))
    with torch.no_grad():
        for p in policy.parameters():
            if p.ndim == 2 and not p.any():  # the output heads and the pooled FiLM
                p.normal_(0, 0.5)
    return policy.eval()


def noise(pipe):
    return batch_noise(["p0", "p1"], [0, 1], latent_shape(pipe, **SIZE))


# ---- the tiny pipelines -------------------------------------------------------------------
def test_the_tiny_pipelines_have_the_real_classes_and_round_trip(pipe, schnell):
    built = build_tiny_flux_pipeline()  # same default seed as the saved folder
    assert isinstance(pipe, FluxPipeline) and isinstance(schnell, FluxPipeline)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert [type(e) for e in (pipe.text_encoder, pipe.text_encoder_2)] == [
        CLIPTextModel,
        T5EncoderModel,
    ]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        saved, loaded = getattr(built, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
    assert len(pipe.tokenizer) == len(built.tokenizer) > 100
    assert len(pipe.tokenizer_2) == len(built.tokenizer_2) > 100
    # dev embeds the guidance scale, schnell takes none
    assert pipe.transformer.config.guidance_embeds is True
    assert schnell.transformer.config.guidance_embeds is False
    # the transformer sees 2x2 patches of the 16 channels; the default is pipe()'s 128x128
    assert pipe.transformer.config.in_channels == 64
    assert latent_shape(pipe) == (16, 128, 128) and latent_shape(pipe, **SIZE) == (16, 16, 16)


def test_the_default_sampler_keeps_the_flow_scheduler_and_ddim_is_refused(root, pipe, schnell):
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.scheduler.config.use_dynamic_shifting is True  # dev's resolution-dependent shift
    assert schnell.scheduler.config.use_dynamic_shifting is False
    with pytest.raises(PipelineError) as exc:
        load_pipeline(str(root / "dev"), scheduler="ddim")
    assert str(exc.value) == (
        f"scheduler 'ddim' does not fit pipeline '{root / 'dev'}': its scheduler "
        "FlowMatchEulerDiscreteScheduler is flow-matching, so use one of flow_euler"
    )


# ---- packing ------------------------------------------------------------------------------
def test_pack_and_unpack_are_the_pipelines_layout_and_invert_each_other():
    latents = torch.randn(2, 16, 6, 10)
    packed = pack_latents(latents)
    assert packed.shape == (2, 3 * 5, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)
    # FluxPipeline._unpack_latents takes pixel sizes: latents x vae scale factor (2 here)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 12, 20, 2), latents)
    # patch (0, 1) is row 1; its features are channel-major over the 2x2 pixels
    assert torch.equal(packed[0, 1, :4], latents[0, 0, 0:2, 2:4].flatten())


def test_odd_latents_are_refused_in_one_line():
    with pytest.raises(ConfigError) as exc:
        pack_latents(torch.zeros(1, 16, 5, 4))
    assert str(exc.value) == (
        "FLUX packs latents into 2x2 patches, so their size must be even, got 5x4; use an "
        "image size that is a multiple of twice the VAE scale factor"
    )
    with pytest.raises(ConfigError, match="^6 packed patches do not make even latents of 4x4"):
        unpack_latents(torch.zeros(1, 6, 64), 4, 4)


# ---- prompt encoding ----------------------------------------------------------------------
def test_embeddings_are_t5s_sequence_with_clips_pooled_output(pipe):
    emb = encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None)
    assert torch.equal(emb.embeds, embeds) and torch.equal(emb.pooled, pooled)
    assert emb.embeds.shape == (2, T5_LENGTH, WIDTH) and emb.pooled.shape == (2, POOLED)
    assert emb.mask.shape == (2, T5_LENGTH)
    assert emb.mask[1].tolist() == [True] * 3 + [False] * (T5_LENGTH - 3)  # "a cat" </s>
    assert emb.truncated == [False, False]
    prompt, tokens, offsets = PROMPTS[0], emb.tokens[0], emb.offsets[0]
    assert [prompt[s:e] for s, e in offsets if e > s] == prompt.split()
    assert tokens[1] == "▁red" and offsets[1] == (2, 5)
    assert tokens[8] == "</s>" and offsets[8] == (0, 0)


def test_there_are_no_negative_embeddings(pipe):
    assert negative_embeddings(pipe) == (None, None)
    emb = encode_prompts(pipe, PROMPTS)
    kwargs = adapter_for(pipe).call_kwargs(emb.embeds, emb.pooled, None, None)
    assert sorted(kwargs) == ["pooled_prompt_embeds", "prompt_embeds"]


def test_the_signature_names_both_encoders_and_the_16_channels(pipe):
    assert pipeline_signature(pipe) == {
        "pipeline_class": "FluxPipeline",
        "text_encoder_class": "CLIPTextModel+T5EncoderModel",
        "text_embed_dim": WIDTH,
        "text_length": T5_LENGTH,
        "pooled_dim": POOLED,
        "latent_channels": 16,
        "default_latent_size": [128, 128],
        "vae_scale_factor": 2,
        "tokenizer_vocab_size": len(pipe.tokenizer),
    }


# ---- generation ---------------------------------------------------------------------------
def test_generate_gives_the_image_of_a_plain_pipe_call_without_a_cfg_batch(pipe):
    latents = noise(pipe)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _, args, kwargs: batches.append(kwargs["hidden_states"].shape), with_kwargs=True
    )
    try:
        ours = generate(pipe, encode_prompts(pipe, PROMPTS), latents, output_type="pt", **STEPS)
    finally:
        hook.remove()
    assert batches == [(2, 8 * 8, 64)] * 3  # one packed batch of 2 per step: no CFG doubling
    plain = pipe(PROMPTS, latents=pack_latents(latents), output_type="pt", **SIZE, **STEPS)
    assert ours.shape == (2, 3, 32, 32)
    assert torch.equal(ours, plain.images)


def test_dev_embeds_the_guidance_scale_and_schnell_ignores_it(pipe, schnell):
    for model, changes in ((pipe, True), (schnell, False)):
        emb, latents = encode_prompts(model, PROMPTS), noise(model)
        low, high = (
            generate(model, emb, latents, num_inference_steps=2, guidance_scale=g, output_type="pt")
            for g in (1.0, 5.0)
        )
        assert low.shape == (2, 3, 32, 32) and torch.isfinite(low).all()
        assert (low - high).abs().max() > 1e-4 if changes else torch.equal(low, high)


# ---- policies -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy_type", ["noise_projector", "npnet"])
def test_a_policy_built_for_flux_changes_the_latents_and_the_image(root, pipe, policy_type):
    policy = policy_for(pipe, root / "dev", policy_type)
    assert policy.config.latent_channels == 16 and policy.config.text_dim == WIDTH
    assert policy.config.pooled_dim == POOLED
    projected, standard = apply_policy(pipe, policy, PROMPTS, [0, 1], return_standard=True, **SIZE)
    assert projected.shape == standard.shape == (2, 16, 16, 16)
    assert (projected - standard).abs().mean() > 0.1
    emb = encode_prompts(pipe, PROMPTS)
    images = generate(pipe, emb, projected, output_type="pt", **STEPS)
    plain = generate(pipe, emb, standard, output_type="pt", **STEPS)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert (images - plain).abs().max() > 1e-3


def test_an_sd_policy_on_flux_names_the_difference(root, pipe):
    with pytest.raises(PipelineError) as exc:
        load_policy(str(root / "sd_projector"), pipe)
    message = str(exc.value)
    assert message.startswith(
        f"policy '{root / 'sd_projector'}' was built for a different pipeline ("
    )
    for part in (
        "pipeline_class: expected 'StableDiffusionPipeline', got 'FluxPipeline'",
        "text_embed_dim: expected 32, got 96",
        "text_length: expected 77, got 512",
        "pooled_dim: expected None, got 32",
        "latent_channels: expected 4, got 16",
        "default_latent_size: expected [16, 16], got [128, 128]",
    ):
        assert part in message, part
    assert "\n" not in message


def test_generate_stage_writes_pngs_with_a_flux_projector(root, pipe, tmp_path):
    policy_for(pipe, root / "dev", "noise_projector").save_pretrained(tmp_path / "projector")
    args = ["--projector", str(tmp_path / "projector"), "--prompt", *PROMPTS, "--seed", "0"]
    args += ["--num_inference_steps", "2", "--height", "32", "--width", "32"]
    args += ["--guidance_scale", "3.5", "--scheduler", "flow_euler"]
    paths = generate_stage.main([*args, "--output_dir", str(tmp_path / "out")])
    assert [p.name for p in paths] == ["000_seed0.png", "001_seed0.png"]
    assert Image.open(paths[0]).size == (32, 32)
