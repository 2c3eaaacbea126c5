"""Best-of-N and early-stop best-of-N: draw N noises per prompt, keep the one the judge prefers.

*Best-of-N* generates every candidate and judges the final images: N·T denoising steps and
N judge calls per image.

*Early-stop best-of-N*, in the spirit of NoisyCLIP (Ramos et al., arXiv 2512.08505, who
report ~50% compute saved at ~98% of post-hoc CLIP best-of-N alignment): every candidate
runs only the first k of T steps (DDIM; flow-matching Euler for SD3 / FLUX, where
x̂0 = x_t − σ_t·v); the predicted x0 at step k is previewed as an image
and judged; only the best candidate is finished, from where it stopped. N·k + (T − k) steps
and N judge calls per image. Previews:

- ``"vae"``: the pipeline's VAE decodes the predicted x0 (exact, costs N decodes);
- ``"linear"``: a fixed per-pixel affine map latent -> RGB (bilinearly upsampled to the image
  size), fitted by least squares once per pipeline on VAE decodes of a few unconditional
  samples (:func:`linear_preview`); nearly free, blurrier. The fit's own steps are a one-off
  per pipeline and are not counted per image.

Example:
    >>> cands = candidate_noise(ids, seeds, 4, latent_shape(pipe))  # doctest: +SKIP
    >>> out = early_stop_best_of_n(pipe, encode_prompts(pipe, prompts), prompts, cands,
    ...                            ShapesJudge(), stop_step=5, num_inference_steps=20,
    ...                            guidance_scale=5.0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image

from ..judges.base import Concept, Judge
from ..noise import batch_noise
from ..pipelines.encoding import PromptEmbeddings, encode_prompts
from ..pipelines.inputs import latent_shape
from ..pipelines.sampling import generate
from ..pipelines.steps import run_steps
from .common import (
    MethodOutput,
    check_batch,
    decode,
    judge_overall,
    to_pil,
)

PREVIEWS = ("vae", "linear")


def _rows(batch: int, n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt, candidate) pairs in prompt-major order, cut into chunks of ``batch_size``."""
    rows = [(b, i) for b in range(batch) for i in range(n)]
    return [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]


def _subset(
    prompts: Sequence[str],
    concepts: Sequence[list[Concept] | None] | None,
    chunk: list[tuple[int, int]],
) -> tuple[list[int], list[str], list[list[Concept] | None] | None]:
    """The chunk's prompt indices, prompts and concepts."""
    owners = [b for b, _ in chunk]
    return (
        owners,
        [prompts[b] for b in owners],
        None if concepts is None else [concepts[b] for b in owners],
    )


def _judge(
    judge: Judge,
    n: int,
    images: list[Image.Image],
    prompts: list[str],
    concepts: list[list[Concept] | None] | None,
) -> list[float]:
    """Overall scores; with a single candidate there is nothing to choose, so no judge call
    (NaN)."""
    if n == 1:
        return [float("nan")] * len(images)
    return judge_overall(judge, images, prompts, concepts)


def _argmax_first(scores: list[list[float]]) -> list[int]:
    """Index of each row's maximum; ties go to the lowest index."""
    return [max(range(len(row)), key=lambda i: (row[i], -i)) for row in scores]


@torch.no_grad()
def best_of_n(
    pipe: DiffusionPipeline,
    emb: PromptEmbeddings,
    prompts: Sequence[str],
    candidates: torch.Tensor,
    judge: Judge,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 64,
    concepts: Sequence[list[Concept] | None] | None = None,
) -> MethodOutput:
    """Generate every candidate ``(B, N, C, h, w)``, judge the images, keep each prompt's best.

    Ties go to the lowest candidate index. N = 1 is the standard method: nothing to choose,
    so the judge is not called (0 judge calls, NaN scores). ``extras``: ``"chosen"`` (B
    candidate indices), ``"scores"`` (B lists of N).
    """
    batch, n = candidates.shape[:2]
    check_batch(prompts, emb, batch, "candidate sets")
    scores = [[float("-inf")] * n for _ in range(batch)]
    images: list[list[Any]] = [[None] * n for _ in range(batch)]
    for chunk in _rows(batch, n, batch_size):
        owners, chunk_prompts, chunk_concepts = _subset(prompts, concepts, chunk)
        latents = torch.stack([candidates[b, i] for b, i in chunk])
        generated = generate(
            pipe,
            emb.select(owners),
            latents,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        for (b, i), image, score in zip(
            chunk, generated, _judge(judge, n, generated, chunk_prompts, chunk_concepts)
        ):
            scores[b][i], images[b][i] = score, image
    chosen = _argmax_first(scores)
    return MethodOutput(
        images=[images[b][c] for b, c in enumerate(chosen)],
        latents=torch.stack([candidates[b, c] for b, c in enumerate(chosen)]).float().cpu(),
        denoising_steps=[float(n * num_inference_steps)] * batch,
        judge_calls=[n if n > 1 else 0] * batch,
        extras={"chosen": chosen, "scores": scores},
    )


@dataclass(frozen=True)
class LinearPreview:
    """Per-pixel affine map latent -> RGB: ``rgb = clamp(weightᵀ · upsample(x) + bias, 0, 1)``.

    ``weight`` ``(C, 3)``, ``bias`` ``(3,)``; ``size`` the ``(H, W)`` of the pipeline's images.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    size: tuple[int, int]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` latents -> ``(B, 3, H, W)`` float32 previews in [0, 1]."""
        x = F.interpolate(latents.float(), size=self.size, mode="bilinear", align_corners=False)
        weight, bias = self.weight.to(x.device), self.bias.to(x.device)
        rgb = torch.einsum("bchw,cd->bdhw", x, weight) + bias.view(1, 3, 1, 1)
        return rgb.clamp(0, 1)


@torch.no_grad()
def fit_linear_preview(pipe: DiffusionPipeline, latents: torch.Tensor) -> LinearPreview:
    """Least-squares :class:`LinearPreview` from clean ``latents`` ``(B, C, h, w)`` and their
    VAE decodes."""
    images = decode(pipe, latents).cpu()
    size = (images.shape[2], images.shape[3])
    x = F.interpolate(latents.float().cpu(), size=size, mode="bilinear", align_corners=False)
    features = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    design = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1)
    targets = images.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(design.double(), targets.double()).solution.float()
    return LinearPreview(weight=solution[:-1], bias=solution[-1], size=size)


_LINEAR_CACHE: weakref.WeakKeyDictionary[Any, LinearPreview] = weakref.WeakKeyDictionary()
FIT_SAMPLES, FIT_STEPS = 8, 20  # unconditional samples and steps of the one-off fit


def linear_preview(pipe: DiffusionPipeline) -> LinearPreview:
    """The pipeline's :class:`LinearPreview`, fitted once and cached.

    Fitted on the clean latents of ``FIT_SAMPLES`` unconditional samples (empty prompt,
    guidance 1, ``FIT_STEPS`` steps) from fixed noise keys, so it is deterministic.
    """
    if pipe not in _LINEAR_CACHE:
        prompts = [""] * FIT_SAMPLES
        keys = [f"noisealign/linear-preview/{i}" for i in range(FIT_SAMPLES)]
        noise = batch_noise(keys, [0] * FIT_SAMPLES, latent_shape(pipe))
        with torch.no_grad():
            trace = run_steps(
                pipe,
                encode_prompts(pipe, prompts),
                noise,
                num_inference_steps=FIT_STEPS,
                guidance_scale=1.0,
            )
        _LINEAR_CACHE[pipe] = fit_linear_preview(pipe, trace.latents)
    return _LINEAR_CACHE[pipe]


def _preview_images(
    pipe: DiffusionPipeline, pred_x0: torch.Tensor, preview: str | LinearPreview
) -> list[Image.Image]:
    if isinstance(preview, LinearPreview):
        # the map is per pixel, so a fit at the default size also previews other sizes
        size = tuple(int(n) * pipe.vae_scale_factor for n in pred_x0.shape[2:])
        return to_pil(pipe, dataclasses.replace(preview, size=size)(pred_x0))
    return to_pil(pipe, decode(pipe, pred_x0))


def _resolve_preview(pipe: DiffusionPipeline, preview: str | LinearPreview) -> str | LinearPreview:
    """``"vae"``, or the :class:`LinearPreview` that ``preview`` names or is."""
    if isinstance(preview, str):
        if preview not in PREVIEWS:
            raise ValueError(
                f"preview must be one of {PREVIEWS} or a LinearPreview, got {preview!r}"
            )
        preview = linear_preview(pipe) if preview == "linear" else "vae"
    return preview


def _finish(
    pipe: DiffusionPipeline,
    emb: PromptEmbeddings,
    stopped: torch.Tensor,
    chosen: list[int],
    stop_step: int,
    batch_size: int,
    steps: dict,
) -> list[Image.Image]:
    """The chosen candidates' final images, run on from their step-``stop_step`` latents."""
    images = []
    batch = stopped.shape[0]
    for start in range(0, batch, batch_size):
        owners = list(range(start, min(start + batch_size, batch)))
        latents = torch.stack([stopped[b, chosen[b]] for b in owners])
        if stop_step < steps["num_inference_steps"]:
            latents = run_steps(pipe, emb.select(owners), latents, start=stop_step, **steps).latents
        images += to_pil(pipe, decode(pipe, latents))
    return images


@torch.no_grad()
def early_stop_best_of_n(
    pipe: DiffusionPipeline,
    emb: PromptEmbeddings,
    prompts: Sequence[str],
    candidates: torch.Tensor,
    judge: Judge,
    *,
    stop_step: int,
    preview: str | LinearPreview = "vae",
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int = 64,
    concepts: Sequence[list[Concept] | None] | None = None,
) -> MethodOutput:
    """Run every candidate ``(B, N, C, h, w)`` for ``stop_step`` steps, judge previews,
    finish the best.

    The preview of a candidate is its predicted x0 after ``stop_step`` steps, decoded by the
    VAE (``"vae"``), by :func:`linear_preview` (``"linear"``) or by a given
    :class:`LinearPreview`. The chosen candidate continues from its step-``stop_step``
    latents, so its final image is the one a full run from its noise gives. As for
    :func:`best_of_n`, N = 1 calls no judge. ``extras``:
    ``"chosen"`` and ``"scores"`` (the preview scores).
    """
    batch, n = candidates.shape[:2]
    check_batch(prompts, emb, batch, "candidate sets")
    if not 1 <= stop_step <= num_inference_steps:
        raise ValueError(f"stop_step must lie in [1, {num_inference_steps}], got {stop_step}")
    preview = _resolve_preview(pipe, preview)
    scores = [[float("-inf")] * n for _ in range(batch)]
    stopped = torch.empty(candidates.shape, dtype=torch.float32)
    steps = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    for chunk in _rows(batch, n, batch_size):
        owners, chunk_prompts, chunk_concepts = _subset(prompts, concepts, chunk)
        latents = torch.stack([candidates[b, i] for b, i in chunk])
        trace = run_steps(pipe, emb.select(owners), latents, stop=stop_step, **steps)
        previews = _preview_images(pipe, trace.pred_x0, preview)
        for row, ((b, i), score) in enumerate(
            zip(chunk, _judge(judge, n, previews, chunk_prompts, chunk_concepts))
        ):
            scores[b][i] = score
            stopped[b, i] = trace.latents[row].cpu()
    chosen = _argmax_first(scores)
    return MethodOutput(
        images=_finish(pipe, emb, stopped, chosen, stop_step, batch_size, steps),
        latents=torch.stack([candidates[b, c] for b, c in enumerate(chosen)]).float().cpu(),
        denoising_steps=[float(n * stop_step + num_inference_steps - stop_step)] * batch,
        judge_calls=[n if n > 1 else 0] * batch,
        extras={"chosen": chosen, "scores": scores},
    )
