"""Stable Diffusion 3 on a tiny random replica of its real classes: loading, the joint CLIP/T5
prompt encoding with offsets, policies on 16-channel latents, generate, and what is refused."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from noisealign import generate as generate_stage
from noisealign.errors import PipelineError
from noisealign.noise import batch_noise
from noisealign.pipelines import (
    encode_prompts,
    generate,
    latent_shape,
    load_pipeline,
    negative_embeddings,
    pipeline_signature,
)
from noisealign.policies import apply_policy, load_policy
from noisealign.policies.pair_training import build_policy
from noisealign.testing.flow_pipelines import build_tiny_sd3_pipeline
from noisealign.testing.pipelines import build_tiny_sd_pipeline

PROMPTS = ["a red circle left of a blue square", "a cat"]
STEPS = dict(num_inference_steps=3, guidance_scale=5.0)
CLIP_LENGTH, T5_LENGTH, WIDTH = 77, 256, 96  # the joint sequence: 77 CLIP + 256 T5 tokens of 96


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """``sd3`` (the tiny SD3 pipeline) and ``sd`` with an SD-shaped projector beside it."""
    root = tmp_path_factory.mktemp("sd3")
    build_tiny_sd3_pipeline(root / "sd3")
    sd = build_tiny_sd_pipeline(root / "sd")
    projector = policy_for(sd, root / "sd", "noise_projector")
    projector.save_pretrained(root / "sd_projector")
    return root


@pytest.fixture(scope="module")
def pipe(root):
    """Shared across tests: do not mutate."""
    return load_pipeline(str(root / "sd3"))


def policy_for(pipe, folder, policy_type):
    """A policy built by the project's factory from the pipeline's signature, as train_npnet does,
    its zero-initialised weights drawn as if trained (a fresh one is the identity map)."""
    config = SimpleNamespace(
        policy_type=policy_type,
        policy_kwargs={"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2},
        pipeline=str(folder),
        seed=0,
    )
    policy = build_policy(config, pipeline_signature(pipe), latent_shape(pipe))
    with torch.no_grad():
        for p in policy.parameters():
            if p.ndim == 2 and not p.any():  # the output heads and the pooled FiLM
                p.normal_(0, 0.5)
    return policy.eval()


def noise(pipe):
    return batch_noise(["p0", "p1"], [0, 1], latent_shape(pipe))


# ---- the tiny pipeline --------------------------------------------------------------------
def test_the_tiny_pipeline_has_the_real_classes_and_round_trips(root, pipe):
    built = build_tiny_sd3_pipeline()  # same default seed as the saved folder
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 16
    assert [type(e) for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)] == [
        CLIPTextModelWithProjection,
        CLIPTextModelWithProjection,
        T5EncoderModel,
    ]
    for name in ("transformer", "vae", "text_encoder_3"):
        saved, loaded = getattr(built, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
    # the offline tokenizers loaded whole (an offline hub lookup can give a 2-token one)
    assert len(pipe.tokenizer) == len(built.tokenizer) > 100
    assert len(pipe.tokenizer_3) == len(built.tokenizer_3) > 100
    assert latent_shape(pipe) == (16, 16, 16)


def test_the_default_sampler_keeps_the_flow_scheduler_and_ddim_is_refused(root, pipe):
    saved = json.loads((root / "sd3" / "scheduler" / "scheduler_config.json").read_text())
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.scheduler.config.shift == saved["shift"] == 3.0
    named = load_pipeline(str(root / "sd3"), scheduler="flow_euler")
    assert type(named.scheduler) is FlowMatchEulerDiscreteScheduler
    with pytest.raises(PipelineError) as exc:
        load_pipeline(str(root / "sd3"), scheduler="ddim")
    assert str(exc.value) == (
        f"scheduler 'ddim' does not fit pipeline '{root / 'sd3'}': its scheduler "
        "FlowMatchEulerDiscreteScheduler is flow-matching, so use one of flow_euler"
    )


def test_generate_gives_the_image_of_a_plain_pipe_call(pipe):
    """The adapter's embeddings are bit-identical to the ones pipe(prompt) computes; the images
    differ by float rounding only: generate passes the one negative row expanded (stride 0),
    pipe(prompt) a materialised copy per prompt, and the attention sums them in another order
    (measured max 1e-6)."""
    latents = noise(pipe)
    emb = encode_prompts(pipe, PROMPTS)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None)
    assert torch.equal(emb.embeds, embeds) and torch.equal(emb.pooled, pooled)
    assert torch.equal(negative_embeddings(pipe)[0].expand(2, -1, -1), neg)
    ours = generate(pipe, emb, latents, output_type="pt", **STEPS)
    plain = pipe(PROMPTS, latents=latents, height=32, width=32, output_type="pt", **STEPS).images
    assert ours.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, plain, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() < 1e-3 * (ours - ours.flip(0)).abs().max()


# ---- prompt encoding ----------------------------------------------------------------------
def test_embeddings_are_the_joint_clip_t5_sequence_with_the_pooled_projections(pipe):
    emb = encode_prompts(pipe, PROMPTS)
    assert emb.embeds.shape == (2, CLIP_LENGTH + T5_LENGTH, WIDTH)
    assert emb.pooled.shape == (2, 2 * 32)  # CLIP-L and CLIP-G projections concatenated
    assert emb.mask.shape == (2, CLIP_LENGTH + T5_LENGTH)
    assert [len(t) for t in emb.tokens] == [len(o) for o in emb.offsets] == [333, 333]
    # the CLIP part's features are the two 32-wide hidden states, zero-padded to T5's width
    assert not emb.embeds[:, :CLIP_LENGTH, 64:].any()
    assert emb.embeds[:, :CLIP_LENGTH, :64].abs().amin(dim=(0, 1)).gt(0).all()
    # "a cat": BOS, 2 words, EOS in the CLIP part; 2 words, </s> in the T5 part
    assert emb.mask[1].tolist() == [True] * 4 + [False] * 73 + [True] * 3 + [False] * 253
    assert emb.truncated == [False, False]


def test_offsets_index_the_prompt_in_both_parts(pipe):
    emb = encode_prompts(pipe, PROMPTS[:1])
    prompt, tokens, offsets = PROMPTS[0], emb.tokens[0], emb.offsets[0]
    words = [prompt[s:e] for s, e in offsets[:CLIP_LENGTH] if e > s]
    assert words == prompt.split() and tokens[2] == "red</w>"
    t5_words = [prompt[s:e] for s, e in offsets[CLIP_LENGTH:] if e > s]
    assert t5_words == prompt.split() and tokens[CLIP_LENGTH + 1] == "▁red"
    assert offsets[2] == offsets[CLIP_LENGTH + 1] == (2, 5)  # "red" in each part
    assert offsets[CLIP_LENGTH + 8] == (0, 0) and tokens[CLIP_LENGTH + 8] == "</s>"


def test_negative_embeddings_are_the_empty_prompts(pipe):
    neg, neg_pooled = negative_embeddings(pipe)
    empty = encode_prompts(pipe, [""])
    assert neg.shape == (1, 333, WIDTH) and neg_pooled.shape == (1, 64)
    assert torch.equal(neg, empty.embeds) and torch.equal(neg_pooled, empty.pooled)


def test_the_signature_names_the_three_encoders_and_the_16_channels(pipe):
    assert pipeline_signature(pipe) == {
        "pipeline_class": "StableDiffusion3Pipeline",
        "text_encoder_class": (
            "CLIPTextModelWithProjection+CLIPTextModelWithProjection+T5EncoderModel"
        ),
        "text_embed_dim": WIDTH,
        "text_length": CLIP_LENGTH + T5_LENGTH,
        "pooled_dim": 64,
        "latent_channels": 16,
        "default_latent_size": [16, 16],
        "vae_scale_factor": 2,
        "tokenizer_vocab_size": len(pipe.tokenizer),
    }


# ---- policies -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy_type", ["noise_projector", "npnet"])
def test_a_policy_built_for_sd3_changes_the_latents_and_the_image(root, pipe, policy_type):
    policy = policy_for(pipe, root / "sd3", policy_type)
    assert policy.config.latent_channels == 16 and policy.config.text_dim == WIDTH
    assert policy.config.pooled_dim == 64
    projected, standard = apply_policy(pipe, policy, PROMPTS, [0, 1], return_standard=True)
    assert projected.shape == standard.shape == (2, 16, 16, 16)
    assert (projected - standard).abs().mean() > 0.1
    emb = encode_prompts(pipe, PROMPTS)
    images = generate(pipe, emb, projected, output_type="pt", **STEPS)
    plain = generate(pipe, emb, standard, output_type="pt", **STEPS)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert (images - plain).abs().max() > 1e-3


def test_an_sd_policy_on_sd3_names_the_difference(root, pipe):
    with pytest.raises(PipelineError) as exc:
        load_policy(str(root / "sd_projector"), pipe)
    message = str(exc.value)
    assert message.startswith(
        f"policy '{root / 'sd_projector'}' was built for a different pipeline ("
    )
    assert message.endswith("); load the pipeline it was trained with or retrain it on this one")
    for part in (
        "pipeline_class: expected 'StableDiffusionPipeline', got 'StableDiffusion3Pipeline'",
        "text_embed_dim: expected 32, got 96",
        "text_length: expected 77, got 333",
        "pooled_dim: expected None, got 64",
        "latent_channels: expected 4, got 16",
    ):
        assert part in message, part
    assert "\n" not in message


def test_generate_stage_writes_pngs_with_an_sd3_projector(root, tmp_path):
    pipe = load_pipeline(str(root / "sd3"))
    policy_for(pipe, root / "sd3", "noise_projector").save_pretrained(tmp_path / "projector")
    args = ["--projector", str(tmp_path / "projector"), "--prompt", *PROMPTS, "--seed", "0"]
    args += ["--num_inference_steps", "2", "--scheduler", "flow_euler"]
    paths = generate_stage.main([*args, "--output_dir", str(tmp_path / "out")])
    assert [p.name for p in paths] == ["000_seed0.png", "001_seed0.png"]
    assert Image.open(paths[0]).size == (32, 32)
    # the recipe's default sampler is DDIM, which an SD3 model refuses in one line
    with pytest.raises(
        PipelineError, match=r"^scheduler 'ddim' does not fit pipeline .* flow_euler$"
    ):
        generate_stage.main([*args[:-2], "--output_dir", str(tmp_path / "ddim")])


# ---- refused ------------------------------------------------------------------------------
def test_an_unsupported_class_is_refused_with_the_supported_list(tmp_path):
    # FluxPipeline was the example until FLUX was supported (tests/test_flux.py)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(PipelineError) as exc:
        load_pipeline(str(tmp_path))
    assert str(exc.value) == (
        "pipeline class 'PixArtAlphaPipeline' is not supported; supported: StableDiffusionPipeline, "
        "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline"
    )
