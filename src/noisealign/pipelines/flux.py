"""FLUX.1: a pooled CLIP vector and T5 text, a flow-matching transformer on packed 16-channel
latents.

FLUX conditions on T5's last hidden state alone (:data:`MAX_SEQUENCE_LENGTH` tokens) and on
CLIP's pooled output; the token positions are the T5 tokenizer's. It runs no classifier-free
guidance batch: FLUX.1-dev is guidance-distilled (``pipe()`` gives ``guidance_scale`` to the
transformer, whose ``config.guidance_embeds`` is set), FLUX.1-schnell is timestep-distilled and
takes no guidance at all. ``true_cfg_scale`` (a negative prompt in newer diffusers) is not used.

Inside the pipeline the latents are packed: 2x2 patches side by side, ``(B, (h/2)(w/2), 4C)``.
Policies and ``batch_noise`` work on the unpacked ``(B, C, h, w)`` noise; :func:`pack_latents`
turns it into what ``pipe(latents=...)`` takes (``prepare_latents`` passes given latents through
unchanged), :func:`unpack_latents` back.

The transformer predicts the flow-matching velocity on the packed latents, at ``timestep / 1000``;
``pipe()``'s schedule is σ = linspace(1, 1/n, n) shifted by ``mu``, which grows with the number of
patches; :meth:`FluxAdapter.set_timesteps` sets the same for the hand-written steps of
:mod:`noisealign.pipelines.steps`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ..errors import ConfigError

# pipe(prompt)'s default max_sequence_length: the length of the T5 sequence
MAX_SEQUENCE_LENGTH = 512


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, (h/2)(w/2), 4C)``, as ``FluxPipeline._pack_latents`` lays them
    out: patch ``(i, j)`` is row ``i * w/2 + j``, its features channel-major over the 2x2 pixels.

    Example:
        >>> pack_latents(torch.zeros(1, 16, 4, 6)).shape
        torch.Size([1, 6, 64])
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ConfigError(
            f"FLUX packs latents into 2x2 patches, so their size must be even, got {h}x{w}; use "
            "an image size that is a multiple of twice the VAE scale factor"
        )
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, (h/2)(w/2), 4C)`` -> ``(B, C, h, w)`` for latents of ``height`` x ``width``: the
    inverse of :func:`pack_latents`."""
    b, n, features = packed.shape
    if n != (height // 2) * (width // 2) or height % 2 or width % 2:
        raise ConfigError(
            f"{n} packed patches do not make even latents of {height}x{width}; pass the latent "
            "size they were packed from"
        )
    patches = packed.reshape(b, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, features // 4, height, width)


class FluxAdapter:
    """FLUX: the T5 sequence ``(B, 512, D_T5)`` and CLIP's pooled output ``(B, P)``; no CFG."""

    load_kwargs: dict[str, Any] = {}
    default_scheduler = "flow_euler"  # keeps a FlowMatchEulerDiscreteScheduler as loaded

    def encode(self, pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled, _ = pipe.encode_prompt(
            prompts,
            None,  # prompt_2 (T5's) defaults to the prompt, as in pipe(prompt)
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return embeds, pooled

    def encode_negative(self, pipe: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None  # no unconditional branch: the guidance is distilled (or absent)

    def call_kwargs(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        neg: torch.Tensor | None,
        neg_pooled: torch.Tensor | None,
    ) -> dict[str, Any]:
        # no negative_prompt_embeds: with them and true_cfg_scale > 1, pipe() would run a CFG batch
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def call_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return pack_latents(latents)

    def model_output(
        self,
        pipe: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        # the arguments FluxPipeline.__call__ (diffusers 0.42.1) gives its transformer
        batch, _, height, width = latents.shape
        device, dtype = latents.device, latents.dtype
        guidance = None
        if pipe.transformer.config.guidance_embeds:  # FLUX.1-dev; schnell has no guidance
            guidance = torch.full([batch], guidance_scale, device=device, dtype=torch.float32)
        out = pipe.transformer(
            hidden_states=pack_latents(latents),
            timestep=timestep.expand(batch).to(device, dtype) / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype),
            img_ids=pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    def set_timesteps(
        self, pipe: Any, scheduler: Any, num_inference_steps: int, latent_size: tuple[int, int]
    ) -> None:
        config = scheduler.config
        mu = calculate_shift(
            (latent_size[0] // 2) * (latent_size[1] // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(num_inference_steps, mu=mu)
            return
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def text_dim(self, pipe: Any) -> int:
        return int(pipe.transformer.config.joint_attention_dim)

    def token_streams(self, pipe: Any) -> list[tuple[Any, int]]:
        return [(pipe.tokenizer_2, MAX_SEQUENCE_LENGTH)]

    def pooled_dim(self, pipe: Any) -> int | None:
        return int(pipe.text_encoder.config.hidden_size)  # CLIPTextModel's pooler_output

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.transformer.config.in_channels) // 4  # it sees 2x2 patches

    def default_latent_size(self, pipe: Any) -> tuple[int, int]:
        # FluxPipeline sets default_sample_size in __init__ (128, for 1024-pixel FLUX.1 images);
        # the transformer's config has no sample size
        return (int(pipe.default_sample_size), int(pipe.default_sample_size))
