"""Tiny random replicas of the models a recipe names, built offline, of the same classes.

The class comes from the model's own config when it is on disk (a local folder or the
Hugging Face cache: only ``model_index.json`` / ``config.json`` are read, never weights),
otherwise from :data:`KNOWN_PIPELINES` / :data:`KNOWN_VLMS`, patterns of the ids the shipped
recipes name. A replica is written once per id under ``<dry_run_dir>/models/`` and reused.

Example:
    >>> from noisealign.dry_run.replicas import pipeline_class
    >>> pipeline_class("stabilityai/stable-diffusion-xl-base-1.0")
    'StableDiffusionXLPipeline'
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from filelock import FileLock
from huggingface_hub import try_to_load_from_cache

from ..errors import ConfigError

# id pattern (case-insensitive search) -> diffusers pipeline class, when no config is on disk
KNOWN_PIPELINES: dict[str, str] = {
    r"stable-diffusion-3|sd-?3": "StableDiffusion3Pipeline",
    r"flux": "FluxPipeline",
    r"stable-diffusion-xl|sdxl": "StableDiffusionXLPipeline",
    r"stable-diffusion-(v1|2)|stable-diffusion-v1-5|sd-?1\.?5": "StableDiffusionPipeline",
}
# id pattern -> transformers model_type of an image-text-to-text VLM
KNOWN_VLMS: dict[str, str] = {
    r"qwen2\.5-vl": "qwen2_5_vl",
    r"qwen2-vl": "qwen2_vl",
    r"llava-v1\.6|llava-next": "llava_next",
    r"llava": "llava",
}
# model_type of CLIP checkpoints
CLIP_TYPES = ("clip",)
# pipeline class -> (module of noisealign.testing, its tiny builder there), imported when used.
# Both FLUX.1 variants get the guidance-distilled (dev-like) replica: the class is what counts.
PIPELINE_BUILDERS: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("pipelines", "build_tiny_sd_pipeline"),
    "StableDiffusionXLPipeline": ("pipelines", "build_tiny_sdxl_pipeline"),
    "StableDiffusion3Pipeline": ("flow_pipelines", "build_tiny_sd3_pipeline"),
    "FluxPipeline": ("flow_pipelines", "build_tiny_flux_pipeline"),
}

# pipeline classes that fix their default latent size in __init__ rather than in a config:
# FluxPipeline draws 128x128 latents (1024-pixel FLUX.1 images) whatever its transformer, so its
# replica would sample at 8x the side of the others' 16x16 (a FLUX dry-run chain took 465 s)
FIXED_DEFAULT_SIZE = ("FluxPipeline",)


def _config_on_disk(name_or_path: str, filename: str) -> dict | None:
    """``filename`` of a local folder, or of a hub id from the local Hugging Face cache."""
    local = Path(name_or_path, filename)
    if local.is_file():
        return json.loads(local.read_text())
    if Path(name_or_path).exists():
        return None
    try:
        cached = try_to_load_from_cache(name_or_path, filename)
    except Exception:  # not a valid repo id: then it is neither cached nor a known id
        return None
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    return None


def _from_table(name: str, table: dict[str, str]) -> str | None:
    for pattern, value in table.items():
        if re.search(pattern, name, re.IGNORECASE):
            return value
    return None


def pipeline_class(name_or_path: str) -> str:
    """The diffusers pipeline class that ``name_or_path`` names, without loading weights."""
    config = _config_on_disk(name_or_path, "model_index.json")
    name = config.get("_class_name") if config else _from_table(name_or_path, KNOWN_PIPELINES)
    if name not in PIPELINE_BUILDERS:
        found = f"its class is {name}" if name else "no model_index.json is on disk"
        raise ConfigError(
            f"dry run cannot build an offline replica of pipeline '{name_or_path}' ({found}); "
            f"replicas exist for {', '.join(PIPELINE_BUILDERS)}: put the pipeline's "
            "model_index.json "
            "in a local folder or the Hugging Face cache, or pass --pipeline with such a model"
        )
    return name


def judge_model_type(judge: str, model: str) -> str:
    """``model_type`` of the model a ``vlm`` or ``clip`` judge loads, without loading weights."""
    config = _config_on_disk(model, "config.json")
    if config and "model_type" in config:
        model_type = config["model_type"]
    elif judge == "clip":
        model_type = "clip"
    else:
        model_type = _from_table(model, KNOWN_VLMS)
    known = (*KNOWN_VLMS.values(),) if judge == "vlm" else CLIP_TYPES
    if model_type not in known:
        found = f"model_type {model_type}" if model_type else "no config.json is on disk"
        raise ConfigError(
            f"dry run cannot build an offline replica of the {judge} judge's model '{model}' "
            f"({found}); replicas exist for {', '.join(known)}: put its config.json in a local "
            "folder or the Hugging Face cache, or set judge_kwargs.model to such a model"
        )
    return model_type


def _testing(module: str) -> ModuleType:
    """A module of noisealign.testing, imported here rather than at the top: the builders
    import noisealign.pipelines, which imports this package."""
    return importlib.import_module(f"..testing.{module}", __package__)


def _build_pipeline(class_name: str, folder: Path) -> None:
    module, builder = PIPELINE_BUILDERS[class_name]
    getattr(_testing(module), builder)(folder)


def _build_judge_model(model_type: str, folder: Path) -> None:
    vlms = _testing("vlms")
    if model_type == "clip":
        vlms.build_tiny_clip(folder)
    else:
        vlms.build_tiny_vlm(model_type, folder)


def slug(name: str) -> str:
    """A file name for a model id or path: ``stabilityai/sdxl`` -> ``stabilityai--sdxl``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name.strip("/")) or "model"


def build_once(root: Path, kind: str, name: str, build: Callable[[Path], None]) -> Path:
    """``root/models/<kind>/<slug of name>``, built by ``build(folder)`` unless already there.

    Processes of one launch may ask at once: a file lock lets one build, into a temporary
    folder renamed into place, and the others reuse it.
    """
    folder = root / "models" / kind / slug(name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not folder.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                build(tmp)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def replica_pipeline(root: Path, name_or_path: str) -> tuple[str, Path]:
    """(class name, folder of its tiny replica) for a recipe's ``pipeline``."""
    class_name = pipeline_class(name_or_path)
    folder = build_once(root, "pipelines", name_or_path, lambda f: _build_pipeline(class_name, f))
    return class_name, folder


def shrink_default_size(pipe: Any) -> list[int] | None:
    """Give a loaded replica of a :data:`FIXED_DEFAULT_SIZE` class the replicas' own latent
    size (``noisealign.testing.pipelines.LATENT_SIZE``); ``[before, after]``, or ``None`` when
    its class takes the size from its config (every other replica)."""
    if type(pipe).__name__ not in FIXED_DEFAULT_SIZE:
        return None
    from ..testing.pipelines import LATENT_SIZE

    before, pipe.default_sample_size = pipe.default_sample_size, LATENT_SIZE
    return [before, LATENT_SIZE]


def replica_judge_model(root: Path, judge: str, model: str) -> tuple[str, Path]:
    """(model_type, folder of its tiny replica) for a ``vlm`` / ``clip`` judge's ``model``."""
    model_type = judge_model_type(judge, model)
    folder = build_once(root, "judges", model, lambda f: _build_judge_model(model_type, f))
    return model_type, folder
