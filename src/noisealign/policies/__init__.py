"""Noise policies: networks that turn the initial noise ε into a prompt-aware ε′.

- :class:`~noisealign.policies.projector.NoiseProjector` — f_θ(ε, e), trained with quasi-DPO
  (``noisealign train_projector``).

Using a trained projector with a diffusers pipeline is one call:

Example:
    >>> from diffusers import StableDiffusionPipeline
    >>> from noisealign.policies import apply_policy, load_projector
    >>> pipe = StableDiffusionPipeline.from_pretrained("src/noisealign/toy/assets/pipeline")  # doctest: +SKIP
    >>> projector = load_projector("outputs/toy/projector", pipe)  # doctest: +SKIP
    >>> prompts = ["a red circle left of a blue square"]
    >>> images = pipe(prompts, latents=apply_policy(pipe, projector, prompts, seeds=[0])).images  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from ..data.prompts import prompt_hash_id
from ..errors import DataError, NoiseAlignError
from ..noise import batch_noise, check_finite
from ..pipelines import PromptEmbeddings, check_compatible, encode_prompts, latent_shape
from ..pipelines import pipeline_signature as _signature
from .projector import NoiseProjector, NoiseProjectorConfig, count_parameters, moment_match


def load_projector(
    path_or_id: str, pipe: DiffusionPipeline | None = None, **hub_kwargs: object
) -> NoiseProjector:
    """Load a projector folder in eval mode; with ``pipe``, check it was trained for that pipeline.

    Raises:
        DataError: missing or broken folder.
        PipelineError: ``pipe``'s text embeddings or latent shape differ from the training pipeline's.
    """
    folder = Path(path_or_id)
    if folder.is_dir():
        missing = [n for n in ("config.json", "model.safetensors") if not (folder / n).is_file()]
        if missing:
            raise DataError(
                f"projector folder '{path_or_id}' has no {' or '.join(missing)}; pass a folder written by train_projector"
            )
    try:
        projector = NoiseProjector.from_pretrained(path_or_id, **hub_kwargs)
    except NoiseAlignError:
        raise
    except Exception as exc:  # hub, safetensors and shape errors all mean "not a projector here"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot load projector '{path_or_id}' ({first[:200]}); pass a folder written by train_projector or a reachable hub id"
        ) from exc
    if pipe is not None:
        check_pipeline(projector, pipe, f"projector '{path_or_id}'")
    return projector.eval()


def check_pipeline(projector: NoiseProjector, pipe: DiffusionPipeline, what: str) -> None:
    """:class:`~noisealign.errors.PipelineError` if ``pipe`` differs from the pipeline recorded in the projector."""
    expected = projector.config.pipeline_signature
    if expected is not None:
        check_compatible(expected, _signature(pipe), what)


@torch.no_grad()
def project(projector: NoiseProjector, noise: torch.Tensor, emb: PromptEmbeddings) -> torch.Tensor:
    """ε′ = f_θ(ε, e) on the projector's device, returned on ε's device and dtype."""
    device = projector.head.weight.device
    emb = emb.to(device)
    out = projector(noise.to(device), emb.embeds, emb.mask, emb.pooled)
    return check_finite(out, "projected noise").to(noise.device, noise.dtype)


def apply_policy(
    pipe: DiffusionPipeline,
    policy: NoiseProjector,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    prompt_ids: Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    return_standard: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Projected initial latents ``(B, C, h, w)`` for ``pipe(prompts, latents=...)``, on the pipe's device/dtype.

    The standard noise is ``noisealign.noise.batch_noise(prompt_ids, seeds, ...)`` (prompt ids
    default to :func:`~noisealign.data.prompts.prompt_hash_id` of each prompt), so the same
    (prompt, seed) always gives the same image. ``return_standard=True`` also returns that
    standard noise, for side-by-side comparisons. Checks the pipeline against the one the
    policy was trained for.
    """
    prompts = list(prompts)
    if len(prompts) != len(seeds):
        raise DataError(
            f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt"
        )
    check_pipeline(policy, pipe, "this projector")
    ids = list(prompt_ids) if prompt_ids is not None else [prompt_hash_id(p) for p in prompts]
    noise = batch_noise(ids, list(seeds), latent_shape(pipe, height, width))
    projected = project(policy, noise, encode_prompts(pipe, prompts))
    device, dtype = pipe._execution_device, pipe.unet.dtype
    projected = projected.to(device, dtype)
    return (projected, noise.to(device, dtype)) if return_standard else projected


__all__ = [
    "NoiseProjector",
    "NoiseProjectorConfig",
    "apply_policy",
    "check_pipeline",
    "count_parameters",
    "load_projector",
    "moment_match",
    "project",
]
