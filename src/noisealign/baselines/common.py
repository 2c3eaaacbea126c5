"""What every baseline shares: its output record, candidate noise and VAE decoding.

The early-stop and Noise Diffusion searches step through the schedule with
:func:`noisealign.pipelines.steps.run_steps`, the loop ``pipe()`` runs with the family's sampler
(DDIM, or flow-matching Euler for SD3 / FLUX), which can start and stop at any step and hands
back the predicted x0 and the model outputs they need.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from ..errors import PipelineError
from ..judges.base import Concept, Judge, score_robustly
from ..noise import batch_noise, initial_noise
from ..pipelines.encoding import PromptEmbeddings


@dataclass
class MethodOutput:
    """What a baseline returns for B prompts.

    Attributes:
        images: B final images.
        latents: ``(B, C, h, w)`` float32 on CPU, the initial noise each final image was
            denoised from.
        denoising_steps: per image, UNet evaluations spent on it, all candidates, replays and
            extra passes included; a CFG-doubled UNet call counts as one step.
        judge_calls: per image, judge calls the method made itself (the evaluation's own
            scoring of the final image is not counted).
        extras: method-specific per-image diagnostics, e.g. ``"chosen"`` (candidate index)
            or ``"scores"`` (the judge scores the choice was made on).
    """

    images: list[Image.Image]
    latents: torch.Tensor
    denoising_steps: list[float]
    judge_calls: list[int]
    extras: dict[str, list] = field(default_factory=dict)


def candidate_noise(
    prompt_ids: Sequence[str], seeds: Sequence[int], n: int, shape: Sequence[int]
) -> torch.Tensor:
    """``(B, n, *shape)`` float32 candidate noises per (prompt id, seed) key.

    Candidate 0 is the standard noise ``batch_noise(prompt_ids, seeds, shape)``, so a
    best-of-1 is the standard method; candidate ``i > 0`` is
    ``initial_noise(f"{prompt_id}/candidate{i}", seed, shape)``.

    Example:
        >>> candidate_noise(["p0", "p1"], [0, 0], 3, (4, 8, 8)).shape
        torch.Size([2, 3, 4, 8, 8])
    """
    if n < 1:
        raise ValueError(f"need at least one candidate, got n={n}")
    first = batch_noise(prompt_ids, seeds, shape)
    others = [
        torch.stack([initial_noise(f"{p}/candidate{i}", s, shape) for i in range(1, n)])
        if n > 1
        else first.new_zeros((0, *shape))
        for p, s in zip(prompt_ids, seeds)
    ]
    return torch.stack([torch.cat([f[None], o]) for f, o in zip(first, others)])


def needs_upcast(pipe: DiffusionPipeline) -> bool:
    """Whether ``pipe()`` would decode in float32: a float16 VAE whose config sets ``force_upcast``.

    The SD 1.5 and SDXL VAEs set it (their activations overflow float16). A bfloat16 VAE is
    never upcast, as in diffusers: bfloat16 has float32's exponent range, so it does not
    overflow, and it decodes in bfloat16.
    """
    vae: Any = pipe.vae
    return vae.dtype == torch.float16 and bool(vae.config.force_upcast)


@contextmanager
def upcast_vae(pipe: DiffusionPipeline) -> Iterator[None]:
    """Hold the pipeline's VAE in float32 inside the block where :func:`needs_upcast`, as
    ``pipe()`` does.

    Adapted from diffusers' ``StableDiffusionXLPipeline.__call__`` (diffusers 0.42.1): cast the
    VAE to float32, decode, cast it back to float16. Here the cast back waits for the end of the
    block, so a backward pass inside it still finds the float32 weights its graph saved; nested
    blocks are no-ops. Elsewhere the VAE is left alone.
    """
    if not needs_upcast(pipe):
        yield
        return
    # torch's Module.to, not diffusers' ModelMixin.to, which (0.42.1) logs a warning on every
    # dtype cast, i.e. twice per decode here
    torch.nn.Module.to(pipe.vae, torch.float32)
    try:
        yield
    finally:
        torch.nn.Module.to(pipe.vae, torch.float16)


def decode(pipe: DiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> ``(B, 3, H, W)`` float32 images in [0, 1], as ``pipe()`` decodes; differentiable.

    A float16 VAE with ``force_upcast`` decodes in float32 (:func:`upcast_vae`) and is float16
    again on return. To differentiate such a decode, call it inside ``with upcast_vae(pipe):``
    and run the backward pass there too; otherwise it raises
    :class:`~noisealign.errors.PipelineError`, since the weights the graph saved would have
    been cast back before the backward pass reads them.
    """
    if needs_upcast(pipe) and torch.is_grad_enabled() and latents.requires_grad:
        raise PipelineError(
            "a differentiable decode with the float16 VAE (force_upcast) must run inside "
            "`with upcast_vae(pipe):`, together with its backward pass"
        )
    with upcast_vae(pipe):
        vae: Any = pipe.vae
        x = _unscale(vae.config, latents.to(vae.device, vae.dtype))
        image = vae.decode(x, return_dict=False)[0].float()
    return (image / 2 + 0.5).clamp(0, 1)


def _unscale(config: Any, x: torch.Tensor) -> torch.Tensor:
    """The VAE's latents from the pipeline's: undo ``scaling_factor`` and SDXL-style mean/std, or
    SD3 / FLUX's ``shift_factor``."""
    if config.get("shift_factor") is not None:
        return x / config.scaling_factor + config.shift_factor
    if config.latents_mean is not None and config.latents_std is not None:
        mean = x.new_tensor(config.latents_mean).view(1, -1, 1, 1)
        std = x.new_tensor(config.latents_std).view(1, -1, 1, 1)
        return x * std / config.scaling_factor + mean
    return x / config.scaling_factor


def to_pil(pipe: DiffusionPipeline, images: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` images in [0, 1] -> PIL, with the pipeline's own rounding."""
    processor: Any = pipe.image_processor
    return processor.numpy_to_pil(processor.pt_to_numpy(images.detach().cpu()))


def judge_overall(
    judge: Judge,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    concepts: Sequence[list[Concept] | None] | None,
) -> list[float]:
    """Overall scores of B images; a sample the judge fails on (after retries) scores -inf."""
    results = score_robustly(judge, images, prompts, concepts)
    return [float("-inf") if f is None else f.overall for f, _ in results]


def check_batch(prompts: Sequence[str], emb: PromptEmbeddings, rows: int, what: str) -> None:
    if len(prompts) != len(emb) or rows != len(emb):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(emb)} prompt embeddings and {rows} {what}; "
            "pass one of each per prompt"
        )
