"""The denoising steps noisealign runs by hand, for what ``pipe()`` cannot do; all in this module.

``pipe()`` runs whole schedules from pure noise (:func:`noisealign.pipelines.generate`, and the
k-step reward inputs through its ``callback_on_step_end``). Three methods need more: NPD
re-denoise sampling inverts a step, the early-stop search starts again from the step it stopped
at and previews the predicted x0 there, and Noise Diffusion replays a run with its model outputs
held fixed. Each runs the steps here, on the sampler every family is trained for:

- **DDIM** (eta = 0) for the UNet families (SD, SDXL): a ``DDIMScheduler`` built from the
  pipeline's scheduler config, whatever sampler the pipeline holds; the inverse step is
  ``DDIMInverseScheduler``'s.
- **flow-matching Euler** for SD3 and FLUX: with σ_0 = 1 > … > σ_n = 0 the pipeline's own
  schedule (its shift included), the model's velocity v at (x_i, σ_i) gives
  ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v`` and ``x̂0 = x_i − σ_i·v``; the inverse step evaluates v at
  the target σ_i on x_{i+1} and goes back, ``x_i = x_{i+1} − (σ_{i+1} − σ_i)·v``.

The model output (ε for DDIM, v for flow matching) is the classifier-free-guided one ``pipe()``
computes, in float32; FLUX runs no CFG batch and embeds ``guidance_scale`` instead
(FLUX.1-dev) or ignores it (FLUX.1-schnell). Latents are the unpacked ``(B, C, h, w)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DiffusionPipeline

from ..errors import PipelineError
from .adapters import adapter_for, denoiser
from .encoding import PromptEmbeddings, negative_embeddings
from .schedulers import stepping_class


def conditioning(
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


@dataclass
class Schedule:
    """The steps of one ``num_inference_steps`` schedule: a fresh scheduler (the pipeline's own
    is left untouched) with its timesteps set as ``pipe()`` sets them, and its family."""

    scheduler: Any
    flow: bool
    num_inference_steps: int

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def sigma(self, index: int) -> torch.Tensor:
        """σ_index of a flow-matching schedule (σ_n = 0), a float32 scalar as the scheduler's
        own step takes it."""
        return self.scheduler.sigmas[index]

    def check(self, index: int) -> None:
        if not 0 <= index < self.num_inference_steps:
            raise ValueError(f"step_index {index} is outside [0, {self.num_inference_steps})")


def schedule(pipe: Any, num_inference_steps: int, latent_size: Sequence[int]) -> Schedule:
    """The hand-written steps' :class:`Schedule` for latents of ``latent_size`` ``(h, w)``: DDIM
    for a DDPM-family model, the pipeline's flow-matching Euler for SD3 / FLUX."""
    cls = stepping_class(pipe)
    scheduler = cls.from_config(pipe.scheduler.config)
    adapter_for(pipe).set_timesteps(pipe, scheduler, num_inference_steps, tuple(latent_size))
    return Schedule(scheduler, cls is not DDIMScheduler, num_inference_steps)


def guided_output(
    pipe: Any,
    latents: torch.Tensor,
    embeds: PromptEmbeddings,
    timestep: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """The model's classifier-free-guided output at ``timestep`` (ε or v), in float32, as
    ``pipe()`` computes it at one step; no gradient."""
    adapter = adapter_for(pipe)
    cond, neg, neg_pooled = conditioning(pipe, embeds, latents.shape[0])
    x = latents.to(pipe._execution_device, denoiser(pipe).dtype)
    cfg = guidance_scale > 1 and neg is not None  # pipe() skips the CFG batch at guidance <= 1
    if cfg:
        x = torch.cat([x, x])
        text = torch.cat([neg, cond.embeds])
        pooled = None if cond.pooled is None else torch.cat([neg_pooled, cond.pooled])
    else:
        text, pooled = cond.embeds, cond.pooled
    with torch.no_grad():
        out = adapter.model_output(pipe, x, timestep, text, pooled, guidance_scale).float()
    if cfg:
        uncond, text_out = out.chunk(2)
        out = uncond + guidance_scale * (text_out - uncond)
    return out


def step(
    sched: Schedule, output: torch.Tensor, index: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_{index+1}, x̂0)`` from ``x`` at step ``index`` and the model's ``output`` there."""
    if sched.flow:
        sigma = sched.sigma(index)
        return x + (sched.sigma(index + 1) - sigma) * output, x - sigma * output
    prev, x0 = sched.scheduler.step(output, sched.timesteps[index], x, return_dict=False)
    return prev, x0


def invert(sched: Schedule, output: torch.Tensor, index: int, x_next: torch.Tensor) -> torch.Tensor:
    """x at step ``index`` from ``x_next`` (at ``index + 1``) and the model's ``output`` on
    ``x_next`` at step ``index``'s timestep: the step :func:`step` would have taken, undone."""
    if sched.flow:
        return x_next - (sched.sigma(index + 1) - sched.sigma(index)) * output
    inverse = DDIMInverseScheduler.from_config(sched.scheduler.config)
    try:
        inverse.set_timesteps(sched.num_inference_steps)
    except ValueError as exc:
        raise PipelineError(
            f"DDIM inversion does not support this scheduler's timestep_spacing "
            f"'{sched.scheduler.config.timestep_spacing}'; use 'leading' or 'trailing'"
        ) from exc
    return inverse.step(output, int(sched.timesteps[index]), x_next).prev_sample


def x0_between(sched: Schedule, index: int, x: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    """The x̂0 of step ``index`` recovered from its input ``x`` and output ``x_next`` alone (what a
    ``pipe()`` callback sees), in float64 arithmetic, in ``x``'s dtype."""
    a, b = x.double(), x_next.double()
    if sched.flow:
        sigma, sigma_next = float(sched.sigma(index)), float(sched.sigma(index + 1))
        velocity = (b - a) / (sigma_next - sigma)
        return (a - sigma * velocity).to(x.dtype)
    # DDIM (eta 0): x_next = a_p·x0 + b_p·eps and x = a_t·x0 + b_t·eps, solved for x0
    scheduler = sched.scheduler
    t = int(sched.timesteps[index])
    prev = t - scheduler.config.num_train_timesteps // sched.num_inference_steps
    alpha_t = scheduler.alphas_cumprod[t].double()
    alpha_p = (
        scheduler.alphas_cumprod[prev].double()
        if prev >= 0
        else scheduler.final_alpha_cumprod.double()
    )
    a_t, b_t, a_p, b_p = alpha_t.sqrt(), (1 - alpha_t).sqrt(), alpha_p.sqrt(), (1 - alpha_p).sqrt()
    return ((b_t * b - b_p * a) / (b_t * a_p - b_p * a_t)).to(x.dtype)


@dataclass
class Trace:
    """End state of :func:`run_steps`: latents, the last step's x̂0, and the model outputs used.

    ``latents`` and ``pred_x0`` are ``(B, C, h, w)`` float32 on the pipeline's device;
    ``model_outputs`` holds one guided output per step run (empty unless recorded).
    """

    latents: torch.Tensor
    pred_x0: torch.Tensor | None
    model_outputs: list[torch.Tensor] = field(default_factory=list)


def run_steps(
    pipe: DiffusionPipeline,
    emb: PromptEmbeddings,
    latents: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    start: int = 0,
    stop: int | None = None,
    record: bool = False,
) -> Trace:
    """Steps ``start .. stop - 1`` of a ``num_inference_steps`` schedule; ``stop - start`` model
    calls.

    ``latents`` sit at step ``start`` (pure noise for 0). From 0 to ``num_inference_steps`` this
    is the loop ``pipe()`` runs with the family's sampler (DDIM / flow-matching Euler).
    """
    stop = num_inference_steps if stop is None else stop
    if not 0 <= start < stop <= num_inference_steps:
        raise ValueError(
            "need 0 <= start < stop <= num_inference_steps, "
            f"got {start}, {stop}, {num_inference_steps}"
        )
    sched = schedule(pipe, num_inference_steps, latents.shape[2:])
    x = latents.to(pipe._execution_device, torch.float32)
    pred_x0, outputs = None, []
    for index in range(start, stop):
        out = guided_output(pipe, x, emb, sched.timesteps[index], guidance_scale)
        if record:
            outputs.append(out)
        x, pred_x0 = step(sched, out, index, x)
    return Trace(latents=x, pred_x0=pred_x0, model_outputs=outputs)


def replay_steps(
    pipe: DiffusionPipeline,
    latents: torch.Tensor,
    model_outputs: Sequence[torch.Tensor],
    *,
    num_inference_steps: int,
) -> torch.Tensor:
    """The update arithmetic of a recorded :func:`run_steps`, with its model outputs held fixed.

    Differentiable with respect to ``latents`` (the model is not called): the final latents of
    the run that recorded ``model_outputs``, as a function of its initial ``latents``. Both DDIM
    (eta = 0, no clipping) and flow-matching Euler are then affine in ``latents``.
    """
    if len(model_outputs) != num_inference_steps:
        raise ValueError(f"got {len(model_outputs)} model outputs for {num_inference_steps} steps")
    sched = schedule(pipe, num_inference_steps, latents.shape[2:])
    x = latents
    for index, out in enumerate(model_outputs):
        x = step(sched, out, index, x)[0]
    return x
