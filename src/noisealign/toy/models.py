"""Configs of the toy text-to-image model: a standard diffusers Stable Diffusion layout, small.

Two presets share one builder: ``toy`` (the committed model, trained in ~30 CPU minutes)
and ``tiny`` (for tests: seconds). The latent grid is 4x16x16 for 32x32 images, so one VAE
downsampling; the UNet attends to the text at 8x8 and 4x4, where objects and their
relations are resolved, and only convolves at 16x16 to keep CPU steps cheap.

Example:
    >>> components = build_components("tiny", "/tmp/tok")
    >>> sorted(components)
    ['scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..pipelines.tokenizers import build_clip_tokenizer
from .grammar import MAX_TOKENS, WORDS

LATENT_SHAPE = (4, 16, 16)
IMAGE_SIZE = 32


@dataclass(frozen=True)
class Preset:
    """Widths of one model size; see :data:`PRESETS`."""

    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]
    attention_head_dim: int
    text_hidden: int
    text_layers: int
    norm_groups: int
    vae_norm_groups: int


PRESETS = {
    # ~0.17M VAE (flat shapes need little; a 32x32 VAE step costs more than a UNet step on
    # CPU), ~4M UNet, ~0.1M text encoder (the feasibility prototype's UNet and text sizes).
    "toy": Preset((16, 32), (32, 64, 128), 8, 64, 2, 16, 8),
    "tiny": Preset((8, 16), (16, 16, 32), 8, 32, 1, 8, 8),
}


def scheduler_config() -> dict[str, Any]:
    """The noise schedule used in training and sampling.

    Cosine betas suit small images (most noise levels stay informative); v-prediction keeps
    the high-noise steps stable where epsilon-prediction blew up in the prototype; trailing
    spacing makes 20-step DDIM start from the last (pure-noise) timestep.
    """
    return {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,  # ignored by trailing spacing; 1 silences a diffusers warning
    }


def build_vae(preset: Preset) -> AutoencoderKL:
    """32x32 RGB in [-1, 1] <-> 4x16x16 latents."""
    n = len(preset.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=preset.vae_channels,
        layers_per_block=1,
        latent_channels=LATENT_SHAPE[0],
        norm_num_groups=preset.vae_norm_groups,
        sample_size=IMAGE_SIZE,
    )


def build_unet(preset: Preset) -> UNet2DConditionModel:
    """16x16 latents -> 8x8 -> 4x4, cross-attention below 16x16."""
    return UNet2DConditionModel(
        sample_size=LATENT_SHAPE[1],
        in_channels=LATENT_SHAPE[0],
        out_channels=LATENT_SHAPE[0],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=preset.unet_channels,
        layers_per_block=1,
        attention_head_dim=preset.attention_head_dim,
        cross_attention_dim=preset.text_hidden,
        norm_num_groups=preset.norm_groups,
    )


def build_text_encoder(preset: Preset, vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    """A small CLIP text transformer over the toy vocabulary, trained with the UNet."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_hidden * 2,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def build_components(size: str, tokenizer_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Fresh (random, seeded) components of a ``StableDiffusionPipeline`` of preset ``size``."""
    if size not in PRESETS:
        raise ValueError(f"unknown toy model size {size!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[size]
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(WORDS, tokenizer_dir, model_max_length=MAX_TOKENS)
    return {
        "vae": build_vae(preset),
        "unet": build_unet(preset),
        "text_encoder": build_text_encoder(
            preset, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
        ),
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**scheduler_config()),
    }


def assemble_pipeline(components: dict[str, Any]) -> StableDiffusionPipeline:
    """A standard pipeline without safety checker (a toy model draws shapes, not people)."""
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """``(B, 16)`` input ids padded exactly as ``StableDiffusionPipeline.encode_prompt`` does."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
