"""Tiny Stable Diffusion and SDXL pipelines from configs, with random seeded weights, offline
(SD3 and FLUX: :mod:`noisealign.testing.flow_pipelines`).

Shapes mirror the real families at toy scale: CLIP text encoders of 2 layers x 32 hidden,
a ~1.5 M-parameter UNet on 16x16 latents, a VAE with two blocks (scale factor 2, so 32x32
images) and a DDIM scheduler. Generating a batch takes a fraction of a second on a CPU.

Example:
    >>> from noisealign.testing.pipelines import build_tiny_sd_pipeline
    >>> pipe = build_tiny_sd_pipeline()
    >>> pipe.vae_scale_factor, pipe.unet.config.sample_size
    (2, 16)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from ..pipelines.tokenizers import build_clip_tokenizer

# Whole-word tokens of the tiny tokenizer: enough for the prompts tests and examples write.
TINY_VOCAB: tuple[str, ...] = tuple(
    (
        # colours
        "red green blue yellow orange purple pink brown black white gray "
        # shapes
        "circle square triangle star heart cross ring rectangle diamond hexagon "
        # animals
        "cat dog bird horse cow sheep fish rabbit bear elephant zebra giraffe duck mouse lion "
        # objects
        "car bus bike boat plane tree house chair table cup bottle book clock lamp ball apple "
        "banana flower hat umbrella bench bed phone kite "
        # relations
        "left right above below on under near next to behind in front top bottom inside beside "
        # counts, sizes, function words
        "one two three four small large big tiny a an the of and with is are photo picture "
        "painting image sitting standing background sky grass water "
    ).split()
)

TEXT_HIDDEN = 32  # CLIP hidden size of each tiny text encoder
LATENT_SIZE = 16  # UNet sample size; images are LATENT_SIZE * 2 pixels


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # eos_token_id must be the tokenizer's: CLIP pools the hidden state at the first EOS token
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(latent_channels: int = 4, **extra: object) -> AutoencoderKL:
    # two blocks -> vae_scale_factor 2**(2-1) = 2
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=LATENT_SIZE * 2,
        **extra,
    )


def _scheduler() -> DDIMScheduler:
    # SD's training schedule; steps_offset=1 as in SD checkpoints (and to silence a FutureWarning)
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        **extra,
    )


def _finish(pipe: Any, folder: str | Path | None) -> None:
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)


def build_tiny_sd_pipeline(
    folder: str | Path | None = None, *, seed: int = 0
) -> StableDiffusionPipeline:
    """A tiny ``StableDiffusionPipeline``; saved to ``folder`` (loadable by ``load_pipeline``) if
    given.

    Weights depend only on ``seed``; the global torch RNG is left untouched.
    """
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer")
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer)).eval(),
            tokenizer=tokenizer,
            unet=_unet(cross_attention_dim=TEXT_HIDDEN),
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        _finish(pipe, folder)
    return pipe


def build_tiny_sdxl_pipeline(
    folder: str | Path | None = None, *, seed: int = 0
) -> StableDiffusionXLPipeline:
    """A tiny ``StableDiffusionXLPipeline`` (two text encoders, ``text_time`` conditioning).

    Saved to ``folder`` if given. Weights depend only on ``seed``.
    """
    time_embed_dim = 8
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer")
        tokenizer_2 = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer_2")
        torch.manual_seed(seed)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer)).eval(),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2)).eval(),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=_unet(
                cross_attention_dim=2 * TEXT_HIDDEN,  # the two encoders' hidden states concatenated
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_embed_dim,
                transformer_layers_per_block=(1, 2),
                # 6 size/crop ids embedded with time_embed_dim each, plus the pooled projection
                projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
            ),
            scheduler=_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        _finish(pipe, folder)
    return pipe
