"""What differs between pipeline families: how prompts are encoded and how the UNet is conditioned.

Everything else in :mod:`noisealign.pipelines` is family-agnostic and looks its adapter up in
:data:`ADAPTERS`, a plain dict keyed by pipeline class. The SD and SDXL adapters live in
:mod:`noisealign.pipelines.unet`, SD3's in :mod:`noisealign.pipelines.sd3`, FLUX's in
:mod:`noisealign.pipelines.flux`.
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
from .unet import StableDiffusionAdapter, StableDiffusionXLAdapter


class PipelineAdapter(Protocol):
    """Family-specific operations on a loaded pipeline.

    ``load_kwargs``: extra keyword arguments for ``DiffusionPipeline.from_pretrained``.
    ``default_scheduler``: the sampler ``load_pipeline`` puts in when the caller names none.
    Embeddings are ``(B, L, D)``, pooled embeddings ``(B, P)`` or ``None`` when the family has none.
    Latents are the unpacked ``(B, C, h, w)`` noise policies see; ``call_latents`` makes what
    ``pipe(latents=...)`` takes of them (FLUX packs 2x2 patches).
    """

    load_kwargs: dict[str, Any]
    default_scheduler: str

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

    def model_output(
        self,
        pipe: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The denoiser's raw output (ε or velocity) on a batch of unpacked ``latents``, as one
        step of ``pipe()`` calls it; the CFG batch, if any, is already in ``latents``."""
        ...

    def set_timesteps(
        self, pipe: Any, scheduler: Any, num_inference_steps: int, latent_size: tuple[int, int]
    ) -> None:
        """Set ``scheduler``'s timesteps as ``pipe()`` does for latents of ``latent_size``."""
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
