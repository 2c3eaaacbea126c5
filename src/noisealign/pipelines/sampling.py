"""Generation from given initial latents through ``pipe()``, and single denoising / inversion
steps.

The initial noise is always chosen by the caller (``noisealign.noise`` or a policy), so the
image for a (prompt, noise) pair is a deterministic function of both: DDIM with eta = 0 by
default. :func:`generate` and :func:`pipeline_latents` run ``pipe()`` with whichever sampler the
pipeline holds (:mod:`noisealign.pipelines.schedulers`); the single steps are the hand-written
ones of :mod:`noisealign.pipelines.steps` (DDIM, or flow-matching Euler for SD3 / FLUX).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from ..errors import ConfigError
from . import steps
from .adapters import adapter_for, denoiser
from .encoding import PromptEmbeddings, check_pipe
from .flux import unpack_latents
from .inputs import check_latents, check_sampling, check_tensor


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
    out = _call(pipe, embeds, latents, num_inference_steps, guidance_scale, output_type)
    # float32 whatever the pipeline dtype, so judges need not care about bf16/fp16 pipelines
    return out.float() if output_type == "pt" else out


def _call(
    pipe: Any,
    embeds: PromptEmbeddings,
    latents: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float,
    output_type: str,
    **extra: Any,
) -> Any:
    """``pipe(...).images`` for the unpacked initial ``latents`` and pre-computed embeddings."""
    adapter = adapter_for(pipe)
    cond, neg, neg_pooled = steps.conditioning(pipe, embeds, latents.shape[0])
    scale = pipe.vae_scale_factor
    return pipe(
        **adapter.call_kwargs(cond.embeds, cond.pooled, neg, neg_pooled),
        latents=adapter.call_latents(latents.to(pipe._execution_device, denoiser(pipe).dtype)),
        height=latents.shape[2] * scale,
        width=latents.shape[3] * scale,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        output_type=output_type,
        generator=step_generators(latents),
        **extra,
    ).images


def pipeline_latents(
    pipe: DiffusionPipeline,
    embeds: PromptEmbeddings,
    latents: torch.Tensor,
    *,
    steps_run: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> list[torch.Tensor]:
    """The latents ``pipe()`` holds after each of its first ``steps_run`` steps from ``latents``.

    ``steps_run`` tensors ``(B, C, h, w)`` in the pipeline's dtype, unpacked. A
    ``callback_on_step_end`` reads them and interrupts the call after the last one, so the
    remaining steps and the VAE decode are not run.
    """
    check_pipe(pipe)
    check_sampling(num_inference_steps, guidance_scale)
    check_tensor(latents)
    if not 1 <= steps_run <= num_inference_steps:
        raise ValueError(f"steps_run must lie in [1, {num_inference_steps}], got {steps_run}")
    h, w = latents.shape[2:]
    seen: list[torch.Tensor] = []

    def read(p: Any, index: int, timestep: Any, tensors: dict) -> dict:
        x = tensors["latents"]
        seen.append(x if x.dim() == 4 else unpack_latents(x, h, w))  # FLUX's are packed
        if len(seen) == steps_run:
            p._interrupt = True  # pipe() skips the steps left and returns the latents
        return tensors

    _call(
        pipe,
        embeds,
        latents,
        num_inference_steps,
        guidance_scale,
        "latent",
        callback_on_step_end=read,
    )
    return seen


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


def denoise_step(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    step_index: int = 0,
) -> torch.Tensor:
    """One step from the ``step_index``-th timestep of a ``num_inference_steps`` schedule: DDIM
    (eta = 0) for SD / SDXL, flow-matching Euler for SD3 / FLUX (:mod:`.steps`).

    Uses a scheduler built from the pipeline's scheduler config (whatever sampler the pipeline
    holds). Returns a tensor of the input's shape, device and dtype.
    """
    check_pipe(pipe)
    check_tensor(latents)
    sched = steps.schedule(pipe, num_inference_steps, latents.shape[2:])
    sched.check(step_index)
    out = steps.guided_output(pipe, latents, embeds, sched.timesteps[step_index], guidance_scale)
    x, _ = steps.step(sched, out, step_index, latents.to(out.device, torch.float32))
    return x.to(latents.device, latents.dtype)


def inversion_step(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    step_index: int = 0,
) -> torch.Tensor:
    """One inversion step that undoes :func:`denoise_step` with the same ``step_index``.

    ``latents`` sit at the timestep *after* the ``step_index``-th one of the schedule; the
    result sits at that timestep. As in diffusers' DDIM inversion loops, the model is evaluated
    at the target timestep (the one the matching denoising step used); DDIM inverts with
    ``DDIMInverseScheduler.from_config(pipe.scheduler.config)``, flow matching with the Euler
    step taken backwards.
    """
    check_pipe(pipe)
    check_tensor(latents)
    sched = steps.schedule(pipe, num_inference_steps, latents.shape[2:])
    sched.check(step_index)
    out = steps.guided_output(pipe, latents, embeds, sched.timesteps[step_index], guidance_scale)
    x = steps.invert(sched, out, step_index, latents.to(out.device, torch.float32))
    return x.to(latents.device, latents.dtype)


def re_denoise(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    num_inference_steps: int = 10,
    guidance_denoise: float = 5.5,
    guidance_invert: float = 1.0,
) -> torch.Tensor:
    """Golden Noise re-denoise sampling: ``x'_T = Inversion(Step(x_T))`` (arXiv 2411.09502,
    Alg. 1).

    One step from ``x_T`` at CFG ``guidance_denoise`` (the paper's omega_l), then one inversion
    step back at ``guidance_invert`` (omega_w < omega_l); the CFG gap is what injects the
    prompt's semantics into the noise. DDIM for SD / SDXL as in the paper, flow-matching Euler
    for SD3 / FLUX. Defaults are the paper's SDXL settings. FLUX runs no CFG batch: there the
    two guidance values are the distilled guidance FLUX.1-dev embeds; on FLUX.1-schnell, which
    embeds none, the two steps differ only in where the velocity is evaluated.
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
