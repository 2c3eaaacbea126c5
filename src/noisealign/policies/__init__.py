"""Noise policies: networks that turn the initial noise ε into a prompt-aware ε′.

Every policy is an ``nn.Module`` + ``PyTorchModelHubMixin`` with
``forward(noise (B, C, H, W), embeds (B, L, D), mask (B, L) bool | None, pooled (B, P) | None)
-> (B, C, H, W)`` in noise's dtype, and a dataclass config saved as ``config.json`` whose
``policy_type`` names its class in :data:`POLICIES`:

- ``noise_projector`` — :class:`~noisealign.policies.projector.NoiseProjector`, f_θ(ε, e) trained
  with quasi-DPO (``noisealign train_projector``); its config.json has no ``policy_type``;
- ``npnet`` — :class:`~noisealign.policies.npnet.NPNet`, the improved NPNet;
- ``npnet_compat`` — :class:`~noisealign.policies.npnet.NPNetCompat`, the official NPNet
  (``noisealign convert_npnet`` turns a released checkpoint into a folder).

Using a trained policy with a diffusers pipeline is one call:

Example:
    >>> from diffusers import StableDiffusionPipeline
    >>> from noisealign.policies import apply_policy, load_policy
    >>> folder = "src/noisealign/toy/assets/pipeline"
    >>> pipe = StableDiffusionPipeline.from_pretrained(folder)  # doctest: +SKIP
    >>> policy = load_policy("outputs/toy/projector", pipe)  # doctest: +SKIP
    >>> prompts = ["a red circle left of a blue square"]
    >>> latents = apply_policy(pipe, policy, prompts, seeds=[0])  # doctest: +SKIP
    >>> images = pipe(prompts, latents=latents).images  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download
from torch import nn

from .. import dry_run
from ..data.prompts import prompt_hash_id
from ..errors import ConfigError, DataError, NoiseAlignError
from ..nn import CONFIG_NAME, WEIGHTS_NAME, parse_config
from ..noise import batch_noise, check_finite, check_seeds, check_strings
from ..pipelines import PromptEmbeddings, check_compatible, encode_prompts, latent_shape
from ..pipelines import pipeline_signature as _signature
from ..pipelines.adapters import denoiser
from ..pipelines.encoding import check_pipe
from .npnet import NPNet, NPNetConfig
from .npnet_compat import NPNetCompat, NPNetCompatConfig
from .projector import NoiseProjector, NoiseProjectorConfig, count_parameters, moment_match

#: policy_type (config.json) -> class; a folder without policy_type is a noise projector.
POLICIES: dict[str, type[nn.Module]] = {
    "noise_projector": NoiseProjector,
    "npnet": NPNet,
    "npnet_compat": NPNetCompat,
}
DEFAULT_POLICY_TYPE = "noise_projector"
_HUB_ARGS = ("revision", "cache_dir", "force_download", "local_files_only", "token")


def _check_location(path_or_id: object, what: str) -> str:
    if isinstance(path_or_id, os.PathLike):
        path_or_id = os.fspath(path_or_id)
    if not isinstance(path_or_id, str) or not path_or_id:
        raise ConfigError(
            f"'path_or_id' is {path_or_id!r}; pass the {what} folder or hub id as a string"
        )
    return path_or_id


def _check_policy(policy: object) -> None:
    if not isinstance(policy, tuple(POLICIES.values())):
        raise ConfigError(
            f"'policy' is a {type(policy).__name__}, not a noisealign policy "
            f"({', '.join(c.__name__ for c in POLICIES.values())}); load one with "
            "load_policy(folder)"
        )


def _read_config(path_or_id: str, what: str, **hub_kwargs: Any) -> dict[str, Any]:
    folder = Path(path_or_id)
    if folder.is_dir():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
        if missing:
            raise DataError(
                f"{what} folder '{path_or_id}' has no {' or '.join(missing)}; pass a folder "
                "written by save_pretrained"
            )
        return parse_config(folder / CONFIG_NAME, what)
    try:
        hub = {k: v for k, v in hub_kwargs.items() if k in _HUB_ARGS}  # not map_location etc.
        path = hf_hub_download(repo_id=path_or_id, filename=CONFIG_NAME, **hub)
    except Exception as exc:  # hub errors come in many types; the first line says which
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot load {what} '{path_or_id}' ({first[:200]}); pass a folder written by "
            "save_pretrained or a reachable hub id"
        ) from exc
    return parse_config(path, what)


def load_policy(
    path_or_id: str,
    pipe: DiffusionPipeline | None = None,
    *,
    what: str = "policy",
    **hub_kwargs: Any,
) -> nn.Module:
    """Load any policy folder (class from config.json's ``policy_type``) in eval mode.

    With ``pipe``, check the policy was trained for that pipeline. ``what`` names the artefact
    in error messages.

    Raises:
        ConfigError: ``path_or_id`` is not a string or path.
        DataError: missing or broken folder, unknown ``policy_type``, weights that do not fit.
        PipelineError: ``pipe`` is not a pipeline, or its text embeddings or latent shape differ
            from the training pipeline's.

    Example:
        >>> policy = load_policy("outputs/sdxl/npnet", pipe)  # doctest: +SKIP
    """
    path_or_id = _check_location(path_or_id, what)
    if pipe is not None:
        check_pipe(pipe)
    config = _read_config(path_or_id, what, **hub_kwargs)
    name = config.get("policy_type", DEFAULT_POLICY_TYPE)
    if name not in POLICIES:
        raise DataError(
            f"{what} '{path_or_id}' has policy_type {name!r}; known: {', '.join(POLICIES)}"
        )
    try:
        policy = POLICIES[name].from_pretrained(path_or_id, what=what, **hub_kwargs)
    except NoiseAlignError as exc:
        raise DataError(f"cannot load {what} '{path_or_id}': {exc}") from exc
    except Exception as exc:  # config fields, safetensors and shape errors: "not this policy"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"cannot load {what} '{path_or_id}' as {name} ({first[:200]}); save it again with "
            "save_pretrained"
        ) from exc
    if pipe is not None:
        check_pipeline(policy, pipe, f"{what} '{path_or_id}'")
    return dry_run.track(what, policy.eval())


def load_projector(
    path_or_id: str, pipe: DiffusionPipeline | None = None, **hub_kwargs: object
) -> nn.Module:
    """:func:`load_policy` with errors that say "projector" (kept for existing callers)."""
    return load_policy(path_or_id, pipe, what="projector", **hub_kwargs)


def check_pipeline(policy: nn.Module, pipe: DiffusionPipeline, what: str) -> None:
    """:class:`~noisealign.errors.PipelineError` if ``pipe`` is not the policy's pipeline."""
    expected = policy.config.pipeline_signature
    if expected is not None:
        check_compatible(expected, _signature(pipe), what)


@torch.no_grad()
def project(policy: nn.Module, noise: torch.Tensor, emb: PromptEmbeddings) -> torch.Tensor:
    """ε′ = f_θ(ε, e) on the policy's device, returned on ε's device and dtype."""
    check_finite(noise, "input noise")
    device = next(policy.parameters()).device
    emb = emb.to(device)
    out = policy(noise.to(device), emb.embeds, emb.mask, emb.pooled)
    return check_finite(out, "projected noise").to(noise.device, noise.dtype)


def apply_policy(
    pipe: DiffusionPipeline,
    policy: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    prompt_ids: Sequence[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    return_standard: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Projected initial latents ``(B, C, h, w)`` for ``pipe(prompts, latents=...)``, on the
    pipe's device and dtype.

    The standard noise is ``noisealign.noise.batch_noise(prompt_ids, seeds, ...)`` (prompt ids
    default to :func:`~noisealign.data.prompts.prompt_hash_id` of each prompt), so the same
    (prompt, seed) always gives the same image. ``return_standard=True`` also returns that
    standard noise, for side-by-side comparisons. Checks the pipeline against the one the
    policy was trained for.

    Raises:
        PipelineError: ``pipe`` is not a supported pipeline, or not the policy's.
        ConfigError: ``policy`` is not a loaded policy; ``prompts`` is a bare string (pass
            ``[prompt]``), empty or not all strings; ``seeds`` (integers, numpy ones included,
            not floats or bools) or ``prompt_ids`` not one per prompt.
    """
    check_pipe(pipe)
    _check_policy(policy)
    prompts = check_strings(prompts, "prompts")
    seeds = check_seeds(seeds, len(prompts))
    ids = (
        [prompt_hash_id(p) for p in prompts]
        if prompt_ids is None
        else check_strings(prompt_ids, "prompt_ids", "prompt id")
    )
    if len(ids) != len(prompts):
        raise ConfigError(
            f"got {len(prompts)} prompts but {len(ids)} prompt_ids; pass one id per prompt or none"
        )
    check_pipeline(policy, pipe, "this policy")
    noise = batch_noise(ids, seeds, latent_shape(pipe, height, width))
    projected = project(policy, noise, encode_prompts(pipe, prompts))
    device, dtype = pipe._execution_device, denoiser(pipe).dtype
    projected = projected.to(device, dtype)
    return (projected, noise.to(device, dtype)) if return_standard else projected


__all__ = [
    "NPNet",
    "NPNetCompat",
    "NPNetCompatConfig",
    "NPNetConfig",
    "NoiseProjector",
    "NoiseProjectorConfig",
    "POLICIES",
    "apply_policy",
    "check_pipeline",
    "count_parameters",
    "load_policy",
    "load_projector",
    "moment_match",
    "project",
]
