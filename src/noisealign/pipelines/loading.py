"""Load a supported diffusers pipeline from a local folder or a hub id, ready for deterministic
sampling."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline
from packaging.version import Version
from safetensors import SafetensorError, safe_open

from .. import dry_run
from ..errors import PipelineError
from .adapters import adapter_for, adapter_for_name
from .schedulers import FAMILY_DEFAULT, SCHEDULERS, check_fits, set_scheduler

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# diffusers 0.42 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns);
# pyproject allows older versions
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def resolve_dtype(torch_dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"`` / ``"fp16"`` / ``torch.float16`` -> ``torch.float16``; :class:`PipelineError`
    if unknown."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype not in DTYPES:
        raise PipelineError(f"unknown torch_dtype '{torch_dtype}'; use one of {', '.join(DTYPES)}")
    return DTYPES[torch_dtype]


def _pipeline_index(name_or_path: str) -> dict:
    """The pipeline's ``model_index.json`` (its ``_class_name`` checked), read before any weight is
    loaded."""
    folder = Path(name_or_path)
    if folder.is_file():
        raise PipelineError(
            f"pipeline '{name_or_path}' is a file; pass the pipeline folder (the one holding "
            "model_index.json, written by save_pretrained) or a hub id"
        )
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        raise PipelineError(
            f"'{name_or_path}' is not a diffusers pipeline folder (no model_index.json); "
            "pass a folder written by save_pretrained or a hub id"
        )
    try:
        config = DiffusionPipeline.load_config(name_or_path)
    except Exception as exc:  # hub errors come in many types; the first line says which
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(
            f"cannot find pipeline '{name_or_path}': not a local folder, and the hub lookup failed "
            f"({first_line}); pass an existing folder or a hub id that is reachable or cached"
        ) from exc
    class_name = config.get("_class_name")
    if not isinstance(class_name, str):  # a [module, class] pair names a custom pipeline
        raise PipelineError(
            f"pipeline '{name_or_path}' is a custom pipeline ({class_name}), which is not supported"
        )
    return config


def _check_components(folder: Path, skipped: dict) -> None:
    """Every component ``model_index.json`` lists (and the adapter does not replace) has its
    folder."""
    index = json.loads((folder / "model_index.json").read_text())
    for name, entry in index.items():
        listed = isinstance(entry, list) and None not in entry
        if listed and name not in skipped and not (folder / name).is_dir():
            raise PipelineError(
                f"pipeline folder '{folder}' has no '{name}/' folder, which its model_index.json "
                "lists; copy the whole pipeline folder (save_pretrained writes every component)"
            )


def _broken_file(folder: Path) -> Path | None:
    """The first config that is not JSON or weights file whose safetensors header does not read."""
    for path in sorted(folder.glob("*/*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return path
    for path in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError:
            return path
    return None


def _loading_error(name_or_path: str, exc: Exception) -> PipelineError:
    """A :class:`PipelineError` naming the folder and, for a local one, its corrupt file."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    broken = _broken_file(Path(name_or_path)) if Path(name_or_path).is_dir() else None
    if broken is not None:
        return PipelineError(
            f"pipeline folder '{name_or_path}': '{broken.relative_to(name_or_path)}' is corrupt "
            f"or truncated ({first}); re-save or re-download the pipeline"
        )
    return PipelineError(
        f"cannot load pipeline '{name_or_path}': {first}; re-save or re-download the pipeline"
    )


def _check_scheduler(
    name_or_path: str, index: dict, scheduler: str | None, scheduler_kwargs: dict | None
) -> str | None:
    """The sampler to load (``"default"`` resolved to the family's), checked against the scheduler
    class ``model_index.json`` names, before any weight loads (:func:`set_scheduler` checks the
    loaded one again)."""
    if scheduler is None:
        if scheduler_kwargs:
            raise PipelineError(
                "scheduler_kwargs need a scheduler; pass scheduler='ddim' or another"
            )
        return None
    if scheduler == FAMILY_DEFAULT:
        scheduler = adapter_for_name(index["_class_name"]).default_scheduler
    _, shipped = index.get("scheduler") or (None, None)  # [library, class], as diffusers saves it
    if shipped:
        check_fits(scheduler, shipped, name_or_path)
    return scheduler


def load_pipeline(
    name_or_path: str,
    *,
    torch_dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    scheduler: str | None = FAMILY_DEFAULT,
    scheduler_kwargs: dict | None = None,
    trust_remote_code: bool = False,
) -> DiffusionPipeline:
    """Load an SD 1.x/2.x, SDXL, SD3 or FLUX pipeline with its progress bar and safety checker off.

    Args:
        name_or_path: a folder written by ``save_pretrained`` or a hub id.
        torch_dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` (short forms too) or a dtype.
        device: where the pipeline's modules go.
        scheduler: a sampler of :data:`.schedulers.SCHEDULERS`, built from the pipeline's
            scheduler config; ``None`` keeps the pipeline's own. The default is the family's:
            DDIM (eta = 0, what the inversion helpers invert) for SD / SDXL, ``flow_euler``
            for SD3 / FLUX (their flow-matching Euler kept as loaded; ``"ddim"`` is refused).
        scheduler_kwargs: extra arguments of the sampler's class.
        trust_remote_code: passed to ``from_pretrained``.

    Raises:
        PipelineError: missing folder / model_index.json / component folder, a file instead of a
            folder, a missing or corrupt config or weights file, unsupported class, unknown
            dtype or scheduler, a scheduler of the other family (flow matching / DDPM) than the
            pipeline's, ``scheduler_kwargs`` its class does not take.

    Example:
        >>> pipe = load_pipeline("runs/tiny_sd")  # doctest: +SKIP
    """
    dtype = resolve_dtype(torch_dtype)
    if scheduler not in (None, FAMILY_DEFAULT, *SCHEDULERS):
        raise PipelineError(
            f"unknown scheduler '{scheduler}'; use one of {', '.join(SCHEDULERS)}, "
            f"'{FAMILY_DEFAULT}' (the pipeline family's) or None"
        )
    index = _pipeline_index(name_or_path)
    adapter = adapter_for_name(index["_class_name"])
    scheduler = _check_scheduler(name_or_path, index, scheduler, scheduler_kwargs)
    if Path(name_or_path).is_dir():
        _check_components(Path(name_or_path), skipped=adapter.load_kwargs)
    try:
        pipe = DiffusionPipeline.from_pretrained(
            name_or_path,
            **{_DTYPE_KWARG: dtype},
            trust_remote_code=trust_remote_code,
            **adapter.load_kwargs,
        )
    except (OSError, SafetensorError, json.JSONDecodeError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a disk or permission error: the top-level handler names its path
        raise _loading_error(name_or_path, exc) from exc
    adapter_for(pipe)  # a custom class under a supported name would be caught here
    if scheduler is not None:
        set_scheduler(pipe, scheduler, scheduler_kwargs, pipeline=name_or_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    logger.info("loaded %s from %s (%s, %s)", type(pipe).__name__, name_or_path, dtype, device)
    return dry_run.track("pipeline", pipe)
