"""What a sampling call is given, checked: the latents' shape for an image size, and the
arguments of :func:`~noisealign.pipelines.sampling.generate` and the single steps.

Each check raises a one-line :class:`~noisealign.errors.ConfigError` naming the argument and
the fix.
"""

from __future__ import annotations

import math
import operator
from numbers import Integral, Real
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..errors import ConfigError
from ..noise import check_finite
from .adapters import adapter_for
from .encoding import PromptEmbeddings, check_pipe


def default_latent_size(pipe: Any) -> tuple[int, int]:
    return adapter_for(pipe).default_latent_size(pipe)


def latent_shape(
    pipe: DiffusionPipeline, height: int | None = None, width: int | None = None
) -> tuple[int, int, int]:
    """``(C, h, w)`` of the initial latents for an image of ``height`` x ``width`` pixels.

    ``None`` takes the default size of the family (what ``pipe(prompt)`` draws). FLUX's latents
    are the unpacked ones too: ``pipe()`` sees them packed (:mod:`noisealign.pipelines.flux`).
    """
    check_pipe(pipe)
    height, width = pixels(height, "height"), pixels(width, "width")
    scale = pipe.vae_scale_factor
    default_h, default_w = default_latent_size(pipe)
    height = default_h * scale if height is None else height
    width = default_w * scale if width is None else width
    step = math.lcm(scale, 8)  # diffusers' pipelines also refuse sizes that are not multiples of 8
    if height <= 0 or width <= 0 or height % step or width % step:
        raise ConfigError(
            f"image size {height}x{width} must be positive multiples of the VAE scale factor "
            f"{scale} and of 8; fix the recipe's height and width"
        )
    return (adapter_for(pipe).latent_channels(pipe), height // scale, width // scale)


def drop_default_size(fingerprint: dict) -> dict:
    """An output folder's ``fingerprint`` without ``height`` / ``width`` when both are unset (the
    pipeline's default), so folders written before the fields existed still resume."""
    if fingerprint.get("height") is None and fingerprint.get("width") is None:
        return {k: v for k, v in fingerprint.items() if k not in ("height", "width")}
    return fingerprint


def pixels(value: object, name: str) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ConfigError(
            f"'{name}' is {value!r}; pass an integer number of pixels or None"
        ) from None


def check_tensor(latents: object) -> None:
    """:class:`ConfigError` unless ``latents`` is a floating-point tensor without NaN/Inf."""
    if not isinstance(latents, torch.Tensor):
        raise ConfigError(
            f"'latents' is a {type(latents).__name__}; pass a (B, C, h, w) torch tensor, e.g. "
            "batch_noise(...)"
        )
    if not latents.is_floating_point():
        raise ConfigError(
            f"'latents' have dtype {latents.dtype}; pass floating-point noise, e.g. "
            "batch_noise(...)"
        )
    try:
        check_finite(latents, "latents")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_sampling(num_inference_steps: object, guidance_scale: object) -> None:
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, Integral)
        or num_inference_steps < 1
    ):
        raise ConfigError(f"'num_inference_steps' is {num_inference_steps!r}; pass an integer >= 1")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, Real)
        or not math.isfinite(guidance_scale)
    ):
        raise ConfigError(f"'guidance_scale' is {guidance_scale!r}; pass a finite number, e.g. 5.0")


def check_latents(
    pipe: Any,
    embeds: PromptEmbeddings,
    latents: torch.Tensor,
    height: int | None,
    width: int | None,
) -> None:
    if not isinstance(embeds, PromptEmbeddings):
        raise ConfigError(
            f"'embeds' is a {type(embeds).__name__}; pass encode_prompts(pipe, prompts)"
        )
    check_tensor(latents)
    if latents.ndim != 4:
        raise ConfigError(
            f"latents must be (B, C, h, w), got shape {tuple(latents.shape)}; draw them with "
            "batch_noise(ids, seeds, latent_shape(pipe))"
        )
    scale = pipe.vae_scale_factor
    height = latents.shape[2] * scale if height is None else height
    width = latents.shape[3] * scale if width is None else width
    expected = latent_shape(pipe, height, width)
    if tuple(latents.shape[1:]) != expected:
        raise ConfigError(
            f"latents have shape {tuple(latents.shape[1:])} per sample but the pipeline expects "
            f"{expected} for {height}x{width} images; draw them with "
            "latent_shape(pipe, height, width)"
        )
    if latents.shape[0] != len(embeds):
        raise ConfigError(
            f"got {latents.shape[0]} latents for {len(embeds)} prompt embeddings; pass one per "
            "prompt"
        )
