"""Noise Diffusion (Miao et al., CVPR 2025, arXiv 2411.16503): judge-guided,
distribution-preserving noise updates.

One round, for current noise z with final image I(z) and judge score s = s(I(z)) in [0, 1]
(for a VQA judge, P("yes")):

    γ   = 1 − √s                                   (large steps for bad images)
    v_i = (√(1−γ) − 1)·z + √γ·σ_i,   σ_i ~ N(0, I), i = 1..N
    σ*  = argmax_i ⟨∇_z s, v_i⟩ / ‖v_i‖²
    z  ← √(1−γ)·z + √γ·σ*                          (= z + v_*, still N(0, I))

∇_z s is taken, as in the paper, through a replay of the sampler with the UNet's
(CFG-combined) predictions of the forward pass held fixed: only the sampler's update
arithmetic (DDIM, or flow-matching Euler for SD3 / FLUX), the VAE decoder and the judge are
differentiated. With the predictions fixed, either sampler (DDIM at eta = 0,
no clipping) is affine in z, so this gradient is a positive multiple of ∂s/∂x₀ — and the
selection rule is invariant to that scale.

The judge must be differentiable: a :class:`DifferentiableJudge`. The candidates σ_i are
derived from the noise's key,
``initial_noise(f"{prompt_id}/noise-diffusion/round{r}/candidate{i}", seed)``, so a run is
deterministic. Cost per image: T denoising steps and one judge call per round,
plus T steps for the final image.

Example:
    >>> out = noise_diffusion(pipe, emb, prompts, noise, ShapesJudge(), prompt_ids=ids,
    ...                       seeds=seeds, rounds=2, num_candidates=8,
    ...                       num_inference_steps=20, guidance_scale=5.0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from diffusers import DiffusionPipeline

from ..errors import JudgeError
from ..judges.base import Judge
from ..noise import distribution_preserving_mix, initial_noise
from ..pipelines.encoding import PromptEmbeddings
from ..pipelines.steps import replay_steps, run_steps
from .common import (
    MethodOutput,
    check_batch,
    decode,
    to_pil,
    upcast_vae,
)


@runtime_checkable
class DifferentiableJudge(Protocol):
    """A judge whose score is differentiable with respect to the pixels.

    ``score_tensor(images, prompts)``: ``images`` ``(B, 3, H, W)`` float in [0, 1],
    ``prompts`` B strings; returns ``(B,)`` scores in [0, 1] with a graph to ``images``.
    """

    name: str

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


def check_differentiable(judge: Judge) -> DifferentiableJudge:
    """``judge`` itself; :class:`~noisealign.errors.JudgeError` naming it if it has no
    ``score_tensor``."""
    if not isinstance(judge, DifferentiableJudge):
        raise JudgeError(
            f"Noise Diffusion needs a differentiable judge with score_tensor(images, prompts), "
            f"but judge '{judge.name}' ({type(judge).__name__}) has none; use e.g. the 'clip' or "
            "'shapes' judge"
        )
    return judge


def step_size(score: torch.Tensor) -> torch.Tensor:
    """γ = 1 − √s, with s clamped to [0, 1]."""
    return 1 - score.clamp(0, 1).sqrt()


def select_candidates(
    grad: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index (B,), projection (B, N))``: argmax_i ⟨∇s, v_i⟩ / ‖v_i‖², ties to the lowest i.

    ``grad`` and ``noise`` ``(B, C, h, w)``, ``sigmas`` ``(B, N, C, h, w)``, ``gamma`` ``(B,)``.
    At γ = 0 every v_i is 0 and the update leaves z unchanged whichever is picked.
    """
    scale = gamma.view(-1, 1, 1, 1, 1)
    moves = ((1 - scale).sqrt() - 1) * noise[:, None] + scale.sqrt() * sigmas
    inner = (grad[:, None] * moves).flatten(2).sum(-1)
    sq_norm = moves.flatten(2).pow(2).sum(-1).clamp_min(torch.finfo(moves.dtype).tiny)
    projection = inner / sq_norm
    return projection.argmax(dim=1), projection


def score_and_gradient(
    pipe: DiffusionPipeline,
    emb: PromptEmbeddings,
    prompts: Sequence[str],
    noise: torch.Tensor,
    judge: DifferentiableJudge,
    *,
    num_inference_steps: int,
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s (B,), ∇_z s (B, C, h, w))`` on CPU, float32, through the fixed-prediction replay."""
    with torch.no_grad():
        trace = run_steps(
            pipe,
            emb,
            noise,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            record=True,
        )
    # the backward pass runs inside the upcast, so it reads the float32 VAE its graph saved
    with torch.enable_grad(), upcast_vae(pipe):
        z = noise.to(pipe._execution_device, torch.float32).requires_grad_(True)
        final = replay_steps(pipe, z, trace.model_outputs, num_inference_steps=num_inference_steps)
        score = judge.score_tensor(decode(pipe, final), list(prompts))
        (grad,) = torch.autograd.grad(score.sum(), z)
    return score.detach().float().cpu(), grad.float().cpu()


def _sigmas(
    prompt_ids: Sequence[str], seeds: Sequence[int], round_: int, n: int, shape: Sequence[int]
) -> torch.Tensor:
    """``(B, n, *shape)`` candidates σ_i of one round, derived from the noise keys."""
    return torch.stack(
        [
            torch.stack(
                [
                    initial_noise(f"{p}/noise-diffusion/round{round_}/candidate{i}", s, shape)
                    for i in range(n)
                ]
            )
            for p, s in zip(prompt_ids, seeds)
        ]
    )


def _update(
    pipe: DiffusionPipeline,
    emb: PromptEmbeddings,
    prompts: list[str],
    z: torch.Tensor,
    rows: list[int],
    judge: DifferentiableJudge,
    keys: tuple[list[str], list[int]],
    round_: int,
    num_candidates: int,
    steps: dict,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round on the noises ``z[rows]`` (updated in place), keyed by ``keys`` = (prompt ids,
    seeds); returns their scores s, step sizes γ and chosen candidates."""
    score, grad = score_and_gradient(pipe, emb, prompts, z[rows], judge, **steps)
    gamma = step_size(score)
    sigmas = _sigmas(*keys, round_, num_candidates, z.shape[1:])
    index, _ = select_candidates(grad, z[rows], sigmas, gamma)
    best = sigmas[torch.arange(len(rows)), index]
    z[rows] = distribution_preserving_mix(z[rows], best, gamma.view(-1, 1, 1, 1))
    return score, gamma, index


def noise_diffusion(
    pipe: DiffusionPipeline,
    emb: PromptEmbeddings,
    prompts: Sequence[str],
    noise: torch.Tensor,
    judge: Judge,
    *,
    prompt_ids: Sequence[str],
    seeds: Sequence[int],
    rounds: int,
    num_candidates: int,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 16,
) -> MethodOutput:
    """``rounds`` Noise Diffusion updates of ``noise`` ``(B, C, h, w)``, then the final images.

    ``prompt_ids`` / ``seeds`` are the noise's keys (the candidates derive from them);
    ``batch_size`` bounds the images differentiated at once (the VAE backward is the memory
    peak). ``rounds = 0`` is the standard method. ``extras``: per image ``"scores"`` and
    ``"gammas"`` (one per round) and ``"chosen"`` (candidate index per round).
    """
    judge = check_differentiable(judge)
    batch = noise.shape[0]
    check_batch(prompts, emb, batch, "noises")
    if len(prompt_ids) != batch or len(seeds) != batch:
        raise ValueError(f"need one prompt id and seed per noise ({batch})")
    if rounds < 0 or num_candidates < 1:
        raise ValueError(
            f"need rounds >= 0 and num_candidates >= 1, got {rounds}, {num_candidates}"
        )
    steps = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    z = noise.float().cpu().clone()
    extras: dict[str, list] = {"scores": [[] for _ in range(batch)]}
    extras.update(gammas=[[] for _ in range(batch)], chosen=[[] for _ in range(batch)])
    images = []
    for start in range(0, batch, batch_size):
        rows = list(range(start, min(start + batch_size, batch)))
        chunk_emb, chunk_prompts = emb.select(rows), [prompts[b] for b in rows]
        keys = [prompt_ids[b] for b in rows], [seeds[b] for b in rows]
        for round_ in range(rounds):
            score, gamma, index = _update(
                pipe, chunk_emb, chunk_prompts, z, rows, judge, keys, round_, num_candidates, steps
            )
            for row, b in enumerate(rows):
                extras["scores"][b].append(float(score[row]))
                extras["gammas"][b].append(float(gamma[row]))
                extras["chosen"][b].append(int(index[row]))
        with torch.no_grad():
            final = run_steps(pipe, chunk_emb, z[rows], **steps).latents
            images += to_pil(pipe, decode(pipe, final))
    return MethodOutput(
        images=images,
        latents=z,
        denoising_steps=[float(num_inference_steps * (rounds + 1))] * batch,
        judge_calls=[rounds] * batch,
        extras=extras,
    )
