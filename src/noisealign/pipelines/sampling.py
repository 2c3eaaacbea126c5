"""Generation from given initial latents, and single DDIM / DDIM-inversion steps.

The initial noise is always chosen by the caller (``noisealign.noise`` or a policy), so the
image for a (prompt, noise) pair is a deterministic function of both: DDIM with eta = 0 by
default; :func:`generate` runs whichever sampler the pipeline holds
(:mod:`noisealign.pipelines.schedulers`), the single steps are always DDIM.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline
from PIL import Image

from ..errors import ConfigError, PipelineError
from .adapters import adapter_for, check_unet_steps, denoiser
from .encoding import PromptEmbeddings, check_pipe, negative_embeddings
from .inputs import check_latents, check_sampling, check_tensor


def _conditioning(
    pipe: Any, embeds: PromptEmbeddings, batch: int
) -> tuple[PromptEmbeddings, torch.Tensor | None, torch.Tensor | None]:
    """Embeddings on the pipeline's device/dtype and the negative ones expanded to ``batch``
    (``None`` for FLUX, which has none)."""
    device, dtype = pipe._execution_device, denoiser(pipe).dtype
    embeds = embeds.to(device, dtype)
    neg, neg_pooled = negative_embeddings(pipe)
    neg = None if neg is None else neg.to(device, dtype).expand(batch, -1, -1)
    neg_pooled = None if neg_pooled is None else neg_pooled.to(device, dtype).expand(batch, -1)
    return embeds, neg, neg_pooled


def generate(
    pipe: DiffusionPipeline,
    embeds: PromptEmbeddings,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    output_type: str = "pil",
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image] | torch.Tensor:
    """Images from the given initial ``latents`` ``(B, C, h, w)`` and prompt embeddings.

    FLUX takes the same unpacked latents; they are packed for ``pipe()`` here. Its
    ``guidance_scale`` is the distilled guidance the transformer embeds (FLUX.1-dev) or unused
    (FLUX.1-schnell): FLUX runs no CFG batch.

    The image size follows from the latents; ``height`` / ``width`` (pixels), when given, are
    checked against them. ``output_type="pt"`` returns ``(B, 3, H, W)`` float32 in [0, 1] on the
    pipeline's device. Runs the pipeline's own scheduler; ``pipe()`` multiplies the latents by
    its ``init_noise_sigma`` (1 for DDIM, sigma_max-sized for Euler), so pass unit-variance
    noise. Deterministic for every sampler of ``SCHEDULERS``: the noise a stochastic one (LCM)
    adds between steps comes from :func:`step_generators`.

    Example:
        >>> images = generate(pipe, encode_prompts(pipe, ["a red circle"]),
        ...                   initial_noise("p0", 0, latent_shape(pipe))[None],
        ...                   num_inference_steps=20, guidance_scale=7.5)  # doctest: +SKIP
    """
    check_pipe(pipe)
    if output_type not in ("pil", "pt"):
        raise ConfigError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
    check_sampling(num_inference_steps, guidance_scale)
    check_latents(pipe, embeds, latents, height, width)
    adapter = adapter_for(pipe)
    cond, neg, neg_pooled = _conditioning(pipe, embeds, latents.shape[0])
    scale = pipe.vae_scale_factor
    out = pipe(
        **adapter.call_kwargs(cond.embeds, cond.pooled, neg, neg_pooled),
        latents=adapter.call_latents(latents.to(pipe._execution_device, denoiser(pipe).dtype)),
        height=latents.shape[2] * scale,
        width=latents.shape[3] * scale,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        output_type=output_type,
        generator=step_generators(latents),
    )
    # float32 whatever the pipeline dtype, so judges need not care about bf16/fp16 pipelines
    return out.images.float() if output_type == "pt" else out.images


def step_generators(latents: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per image ``(B, C, h, w)``, seeded by a hash of its initial latents.

    The noise a stochastic sampler (LCM) draws between steps then depends on the image's own
    noise only, not on its batch or device. DDIM (eta = 0), Euler and DPM-Solver++ draw nothing
    they use, so their images do not change.
    """
    generators = []
    for x in latents.detach().to("cpu", torch.float32):
        digest = hashlib.sha256(x.contiguous().numpy().tobytes()).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little")))
    return generators


def _guided_noise(
    pipe: Any,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    timestep: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free-guided UNet noise prediction, in float32, as ``pipe()`` computes it at one
    step."""
    check_unet_steps(pipe, "the DDIM loop")
    adapter = adapter_for(pipe)
    cond, neg, neg_pooled = _conditioning(pipe, embeds, latents.shape[0])
    x = latents.to(pipe._execution_device, pipe.unet.dtype)
    scale = pipe.vae_scale_factor
    size = (x.shape[2] * scale, x.shape[3] * scale)
    if guidance_scale > 1:  # pipe() skips the unconditional branch at guidance <= 1
        x = torch.cat([x, x])
        text = torch.cat([neg, cond.embeds])
        pooled = None if cond.pooled is None else torch.cat([neg_pooled, cond.pooled])
    else:
        text, pooled = cond.embeds, cond.pooled
    with torch.no_grad():
        eps = pipe.unet(
            x, timestep, encoder_hidden_states=text, **adapter.unet_kwargs(pipe, pooled, *size)
        ).sample
    eps = eps.float()
    if guidance_scale > 1:
        uncond, text_eps = eps.chunk(2)
        eps = uncond + guidance_scale * (text_eps - uncond)
    return eps


def _ddim(
    pipe: Any, num_inference_steps: int, step_index: int
) -> tuple[DDIMScheduler, torch.Tensor]:
    """A fresh DDIM scheduler (the pipeline's own is left untouched) and its ``step_index``-th
    timestep."""
    check_unet_steps(pipe, "the DDIM loop")
    if not 0 <= step_index < num_inference_steps:
        raise ValueError(f"step_index {step_index} is outside [0, {num_inference_steps})")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler, scheduler.timesteps[step_index]


def denoise_step(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    step_index: int = 0,
) -> torch.Tensor:
    """One DDIM step (eta = 0) from the ``step_index``-th timestep of a ``num_inference_steps``
    schedule.

    Uses a ``DDIMScheduler`` built from the pipeline's scheduler config (whatever the pipeline's
    own scheduler is). Returns a tensor of the input's shape, device and dtype.
    """
    check_pipe(pipe)
    check_tensor(latents)
    check_unet_steps(pipe, "denoise_step")
    scheduler, t = _ddim(pipe, num_inference_steps, step_index)
    eps = _guided_noise(pipe, latents, embeds, t, guidance_scale)
    x = latents.to(eps.device, torch.float32)
    out = scheduler.step(eps, t, x).prev_sample
    return out.to(latents.device, latents.dtype)


def inversion_step(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    step_index: int = 0,
) -> torch.Tensor:
    """One DDIM-inversion step that undoes :func:`denoise_step` with the same ``step_index``.

    ``latents`` sit at the timestep *after* the ``step_index``-th one of the DDIM schedule; the
    result sits at that timestep. As in diffusers' inversion loops, the UNet is evaluated at
    the target timestep (the one the matching denoising step used), with
    ``DDIMInverseScheduler.from_config(pipe.scheduler.config)``.
    """
    check_pipe(pipe)
    check_tensor(latents)
    check_unet_steps(pipe, "inversion_step")
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    try:
        inverse.set_timesteps(num_inference_steps)
    except ValueError as exc:
        raise PipelineError(
            f"DDIM inversion does not support this scheduler's timestep_spacing "
            f"'{pipe.scheduler.config.timestep_spacing}'; use 'leading' or 'trailing'"
        ) from exc
    _, t = _ddim(pipe, num_inference_steps, step_index)
    eps = _guided_noise(pipe, latents, embeds, t, guidance_scale)
    x = latents.to(eps.device, torch.float32)
    out = inverse.step(eps, int(t), x).prev_sample
    return out.to(latents.device, latents.dtype)


def re_denoise(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    num_inference_steps: int = 10,
    guidance_denoise: float = 5.5,
    guidance_invert: float = 1.0,
) -> torch.Tensor:
    """Golden Noise re-denoise sampling: ``x'_T = DDIM-Inversion(DDIM(x_T))`` (arXiv 2411.09502,
    Alg. 1).

    One DDIM step from ``x_T`` at CFG ``guidance_denoise`` (the paper's omega_l), then one
    inversion step back at ``guidance_invert`` (omega_w < omega_l); the CFG gap is what injects
    the prompt's semantics into the noise. Defaults are the paper's SDXL settings.
    """
    x_prev = denoise_step(
        pipe,
        latents,
        embeds,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_denoise,
    )
    return inversion_step(
        pipe,
        x_prev,
        embeds,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_invert,
    )
