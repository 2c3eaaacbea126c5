"""Stable Diffusion 1.x / 2.x and SDXL: CLIP text encoders and a UNet predicting the noise on
4-channel latents, sampled with DDIM by default."""

from __future__ import annotations

from typing import Any

import torch


def sample_size(denoiser: torch.nn.Module) -> tuple[int, int]:
    """``(h, w)`` of a UNet's or SD3 transformer's ``config.sample_size`` (an int or a pair)."""
    size = denoiser.config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def pooled_call_kwargs(
    embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    neg: torch.Tensor,
    neg_pooled: torch.Tensor | None,
) -> dict[str, Any]:
    """``pipe(...)``'s embedding arguments for a family with pooled embeddings (SDXL, SD3)."""
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": neg,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": neg_pooled,
    }


class UNetFamily:
    """What the UNet families (SD, SDXL) share: DDIM by default, the UNet call, and unpacked
    latents of the UNet's channels and sample size."""

    default_scheduler = "ddim"

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.unet

    def call_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.unet.config.in_channels)

    def default_latent_size(self, pipe: Any) -> tuple[int, int]:
        return sample_size(pipe.unet)

    def model_output(
        self,
        pipe: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        height, width = (n * pipe.vae_scale_factor for n in latents.shape[2:])
        extra = self.unet_kwargs(pipe, pooled, height, width)
        return pipe.unet(latents, timestep, encoder_hidden_states=embeds, **extra).sample

    def set_timesteps(
        self, pipe: Any, scheduler: Any, num_inference_steps: int, latent_size: tuple[int, int]
    ) -> None:
        scheduler.set_timesteps(num_inference_steps)

    def unet_kwargs(
        self, pipe: Any, pooled: torch.Tensor | None, height: int, width: int
    ) -> dict[str, Any]:
        """Extra UNet keyword arguments for a batch whose pooled embeddings are ``pooled``; pixel
        size."""
        return {}


class StableDiffusionAdapter(UNetFamily):
    """SD 1.x / 2.x: one CLIP text encoder, last hidden state, no pooled embedding."""

    # The safety checker would replace "NSFW" images by black ones and needs a CLIP vision model.
    load_kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}

    def encode(self, pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, _ = pipe.encode_prompt(
            prompts,
            pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, None

    def encode_negative(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, neg = pipe.encode_prompt(
            [""], pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return neg, None

    def call_kwargs(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        neg: torch.Tensor,
        neg_pooled: torch.Tensor | None,
    ) -> dict[str, Any]:
        return {"prompt_embeds": embeds, "negative_prompt_embeds": neg}

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        return [pipe.text_encoder]

    def text_dim(self, pipe: Any) -> int:
        return int(pipe.text_encoder.config.hidden_size)

    def token_streams(self, pipe: Any) -> list[tuple[Any, int]]:
        return [(pipe.tokenizer, int(pipe.tokenizer.model_max_length))]

    def pooled_dim(self, pipe: Any) -> int | None:
        return None


class StableDiffusionXLAdapter(UNetFamily):
    """SDXL: two CLIP encoders (penultimate layers concatenated), pooled projection and size ids."""

    load_kwargs: dict[str, Any] = {}

    def encode(self, pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, pooled

    def encode_negative(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        # zeros when the pipeline's force_zeros_for_empty_prompt is set (SDXL base), as pipe() does
        _, neg, _, neg_pooled = pipe.encode_prompt(
            [""],
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
        )
        return neg, neg_pooled

    def call_kwargs(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        neg: torch.Tensor,
        neg_pooled: torch.Tensor | None,
    ) -> dict[str, Any]:
        return pooled_call_kwargs(embeds, pooled, neg, neg_pooled)

    def unet_kwargs(
        self, pipe: Any, pooled: torch.Tensor | None, height: int, width: int
    ) -> dict[str, Any]:
        if pooled is None:
            raise ValueError(
                "SDXL needs pooled text embeddings; encode the prompts with encode_prompts"
            )
        # original size, crop top-left, target size: the defaults pipe() uses for a plain call
        time_ids = torch.tensor(
            [[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=pooled.device
        )
        return {
            "added_cond_kwargs": {
                "text_embeds": pooled,
                "time_ids": time_ids.expand(pooled.shape[0], -1),
            }
        }

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        return [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]

    def text_dim(self, pipe: Any) -> int:
        # both encoders' penultimate hidden states, concatenated along the features
        return sum(int(e.config.hidden_size) for e in self.text_encoders(pipe))

    def token_streams(self, pipe: Any) -> list[tuple[Any, int]]:
        # the two tokenizers give the same positions; the first one's tokens stand for both
        return [(pipe.tokenizer, int(pipe.tokenizer.model_max_length))]

    def pooled_dim(self, pipe: Any) -> int | None:
        return int(pipe.text_encoder_2.config.projection_dim)
