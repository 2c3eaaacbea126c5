"""What differs between pipeline families: how prompts are encoded and how the UNet is conditioned.

Everything else in :mod:`noisealign.pipelines` is family-agnostic and looks its adapter up in
:data:`ADAPTERS`, a plain dict keyed by pipeline class. SD3's adapter lives in
:mod:`noisealign.pipelines.sd3`, FLUX's in :mod:`noisealign.pipelines.flux`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from ..errors import PipelineError
from .flux import FluxAdapter
from .sd3 import StableDiffusion3Adapter


class PipelineAdapter(Protocol):
    """Family-specific operations on a loaded pipeline.

    ``load_kwargs``: extra keyword arguments for ``DiffusionPipeline.from_pretrained``.
    ``default_scheduler``: the sampler ``load_pipeline`` puts in when the caller names none.
    ``unet_steps``: whether the hand-written DDIM steps (:mod:`.sampling`'s ``denoise_step``,
    ``inversion_step`` and the search baselines' loop, all on ``pipe.unet``) support the family.
    Embeddings are ``(B, L, D)``, pooled embeddings ``(B, P)`` or ``None`` when the family has none.
    Latents are the unpacked ``(B, C, h, w)`` noise policies see; ``call_latents`` makes what
    ``pipe(latents=...)`` takes of them (FLUX packs 2x2 patches).
    """

    load_kwargs: dict[str, Any]
    default_scheduler: str
    unet_steps: bool

    def encode(self, pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embeds, pooled)`` exactly as ``pipe(prompt)`` computes them."""
        ...

    def encode_negative(self, pipe: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(embeds, pooled)`` with batch 1 that ``pipe(prompt)`` uses when no negative prompt is
        given; ``(None, None)`` for a family that runs no CFG batch (FLUX)."""
        ...

    def call_kwargs(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        neg: torch.Tensor | None,
        neg_pooled: torch.Tensor | None,
    ) -> dict[str, Any]:
        """Keyword arguments of ``pipe(...)`` that pass pre-computed embeddings."""
        ...

    def call_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` ``(B, C, h, w)`` as ``pipe(latents=...)`` takes them."""
        ...

    def unet_kwargs(
        self, pipe: Any, pooled: torch.Tensor | None, height: int, width: int
    ) -> dict[str, Any]:
        """Extra UNet keyword arguments for a batch whose pooled embeddings are ``pooled``; pixel
        size."""
        ...

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        """The text encoders whose hidden states make up the embeddings."""
        ...

    def text_dim(self, pipe: Any) -> int:
        """``D`` of the embeddings."""
        ...

    def token_streams(self, pipe: Any) -> list[tuple[Any, int]]:
        """``(tokenizer, padded length)`` of each tokenizer whose padded token sequences,
        concatenated in this order, are the ``L`` positions of the embeddings."""
        ...

    def pooled_dim(self, pipe: Any) -> int | None:
        """``P`` of the pooled embeddings, or ``None``."""
        ...

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        """The network the latents go through (UNet or transformer); its dtype is theirs."""
        ...

    def latent_channels(self, pipe: Any) -> int:
        """``C`` of the unpacked latents."""
        ...

    def default_latent_size(self, pipe: Any) -> tuple[int, int]:
        """``(h, w)`` of the latents ``pipe(prompt)`` draws when given no image size."""
        ...


def sample_size(denoiser: torch.nn.Module) -> tuple[int, int]:
    """``(h, w)`` of a UNet's or SD3 transformer's ``config.sample_size`` (an int or a pair)."""
    size = denoiser.config.sample_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class UNetFamily:
    """What the UNet families (SD, SDXL) share: DDIM by default, the hand-written DDIM steps, and
    unpacked latents of the UNet's channels and sample size."""

    default_scheduler = "ddim"
    unet_steps = True

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.unet

    def call_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.unet.config.in_channels)

    def default_latent_size(self, pipe: Any) -> tuple[int, int]:
        return sample_size(pipe.unet)


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

    def unet_kwargs(
        self, pipe: Any, pooled: torch.Tensor | None, height: int, width: int
    ) -> dict[str, Any]:
        return {}

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
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": neg,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": neg_pooled,
        }

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


# pipeline class -> adapter; the only place that knows which families are supported.
ADAPTERS: dict[type, PipelineAdapter] = {
    StableDiffusionPipeline: StableDiffusionAdapter(),
    StableDiffusionXLPipeline: StableDiffusionXLAdapter(),
    StableDiffusion3Pipeline: StableDiffusion3Adapter(),
    FluxPipeline: FluxAdapter(),
}


def supported_names() -> list[str]:
    """Class names of the supported pipelines, for error messages."""
    return [cls.__name__ for cls in ADAPTERS]


def adapter_for_name(class_name: str) -> PipelineAdapter:
    """The adapter for a ``model_index.json`` ``_class_name``; :class:`PipelineError` if
    unsupported."""
    for cls, adapter in ADAPTERS.items():
        if cls.__name__ == class_name:
            return adapter
    raise PipelineError(
        f"pipeline class '{class_name}' is not supported; supported: {', '.join(supported_names())}"
    )


def adapter_for(pipe: DiffusionPipeline) -> PipelineAdapter:
    """The adapter for a loaded pipeline (subclasses of a supported class are accepted)."""
    for cls, adapter in ADAPTERS.items():
        if isinstance(pipe, cls):
            return adapter
    raise PipelineError(
        f"pipeline class '{type(pipe).__name__}' is not supported; supported: "
        f"{', '.join(supported_names())}"
    )


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    """The UNet or transformer of a loaded pipeline of a supported family."""
    return adapter_for(pipe).denoiser(pipe)


def check_unet_steps(pipe: DiffusionPipeline, what: str) -> None:
    """:class:`PipelineError` naming ``what`` unless the hand-written DDIM steps support
    ``pipe``."""
    if adapter_for(pipe).unet_steps:
        return
    supported = [cls.__name__ for cls, a in ADAPTERS.items() if a.unet_steps]
    raise PipelineError(
        f"{what} needs a UNet, and {type(pipe).__name__} has a flow-matching transformer: the "
        "hand-written DDIM steps (NPD re-denoise, reward inputs at input_steps > 0, the "
        f"early-stop and Noise Diffusion searches) support {', '.join(supported)} only"
    )
