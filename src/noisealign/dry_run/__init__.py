"""Dry runs: a recipe run as written, on tiny random models of the same classes.

In the spirit of Lightning's ``fast_dev_run``: ``--dry_run true`` runs the stage's real code
(pipeline and judge classes, the recipe's dtype, accelerate's devices and process count,
sharding, checkpoints, resume, the tracker, the saved folders) with three changes, made
here right after the recipe is parsed:

- every model the recipe names (the diffusers pipeline, the ``vlm`` / ``clip`` judges' models)
  is replaced by a tiny random replica of the same class, built offline
  (:mod:`noisealign.dry_run.replicas`);
- every path is mirrored under ``dry_run_dir``: the output folder, and the folders an earlier
  stage wrote (dataset, reward model, teacher, policy), so a chain of dry runs reads its own
  outputs and never touches the real ones;
- the work is cut to a few prompts, seeds and steps (:data:`CUTS`).

The stage ends with a report (:func:`noisealign.dry_run.report.report`): what was built, each
model's class, dtype and device on every rank, peak memory, and the outputs it read back.

Example:
    ``noisealign train_projector --config recipes/sd15/train_projector.yaml --dry_run true``
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .replicas import replica_judge_model, replica_pipeline, shrink_default_size

logger = logging.getLogger(__name__)

MARKER = ".noisealign-dry-run"  # in dry_run_dir: a folder this module made and may write into
PROMPTS_PER_SPLIT = 8  # prompts kept of each split of a prompt file
STEPS = 2


def _first_seeds(seeds: Any) -> Any:
    # here, not at the top: data.prompts imports noisealign.judges, which imports this module
    from ..data.prompts import parse_seeds

    kept = parse_seeds(seeds)[:2]
    return kept if isinstance(seeds, list) else ",".join(map(str, kept))


def _short_searches(methods: dict) -> dict:  # early stop after the first of the cut steps
    return {k: {**m, "stop_step": 1} if "stop_step" in m else m for k, m in methods.items()}


# field -> how a dry run cuts its value (fields a stage does not have are left alone)
CUTS: dict[str, Callable[[Any], Any]] = {
    "seeds": _first_seeds,
    "num_inference_steps": lambda v: STEPS,  # sampling steps: the code paths are the same
    "methods": _short_searches,
    "max_steps": lambda v: STEPS,
    "batch_size": lambda v: min(v, 4),  # 16 x 8 candidates of a real reward model: slow on a CPU
    "num_epochs": lambda v: 1,
    "save_steps": lambda v: 1,
    "eval_steps": lambda v: 1,
    "logging_steps": lambda v: 1,
    "image_steps": lambda v: STEPS,
    "image_prompts": lambda v: v[:1],
    "image_seeds": lambda v: v[:1],
    "teacher_seeds": lambda v: 2,
    "max_prompts": lambda v: 2 if v is None else min(v, 2),
    "height": lambda v: None,  # the replica's own size
    "width": lambda v: None,
    "unet_steps": lambda v: STEPS,
    "vae_steps": lambda v: STEPS,
    "eval_prompts": lambda v: 2,
    "eval_seeds": lambda v: 1,
}
# fields naming a folder an earlier stage wrote
INPUT_FOLDERS = (
    "dataset",
    "reward_model",
    "teacher",
    "init_from",
    "candidate_images",
    "projector",
)


@dataclasses.dataclass
class Plan:
    """What :func:`prepare` changed, for the report."""

    stage: str
    root: Path
    output_dir: str
    built: list[dict[str, str]] = dataclasses.field(default_factory=list)
    changed: dict[str, list[Any]] = dataclasses.field(default_factory=dict)


_PLAN: Plan | None = None
_TRACKED: list[tuple[str, Any]] = []


def track(role: str, obj: Any) -> Any:
    """Remember a loaded model for the report (a no-op outside a dry run); returns ``obj``.

    A loaded pipeline (always a replica in a dry run) whose class fixes its default size in
    ``__init__`` gets the replicas' latent size here, and the report names the change."""
    if _PLAN is not None:
        _TRACKED.append((role, obj))
        shrunk = shrink_default_size(obj) if role == "pipeline" else None
        if shrunk is not None:
            _PLAN.changed["pipeline.default_sample_size"] = shrunk
    return obj


def reset() -> None:
    """Leave dry-run mode (the next stage in this process runs for real unless it asks again)."""
    global _PLAN
    _PLAN = None
    _TRACKED.clear()


def mirror(root: Path, path: str) -> Path:
    """``path`` under ``root``: ``outputs/sd15/collect`` -> ``<root>/outputs/sd15/collect``."""
    p = Path(path)
    if p.is_absolute() or os.path.normpath(p).startswith(".."):
        p = Path(os.path.abspath(p))
        p = p.relative_to(p.anchor)
    else:
        p = Path(os.path.normpath(p))
    if _inside(Path(path), root):
        return Path(path)
    return root / p


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _claim_root(root: Path, output_dir: str) -> None:
    if _inside(root, Path(output_dir)) and not _inside(Path(output_dir), root):
        raise ConfigError(
            f"dry_run_dir '{root}' lies inside the recipe's output_dir '{output_dir}'; a dry run "
            "never writes into real outputs: pass --dry_run_dir elsewhere"
        )
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise ConfigError(
            f"dry_run_dir '{root}' holds files a dry run did not write; pass --dry_run_dir "
            "with a new or empty folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("folder written by noisealign dry runs; safe to delete\n")


def _set(config: Any, plan: Plan, name: str, value: Any) -> None:
    before = getattr(config, name)
    if before != value:
        plan.changed[name] = [before, value]
        setattr(config, name, value)


def prepare(config: Any) -> Any:
    """Turn a parsed recipe into its dry run (in place); returns it."""
    global _PLAN
    root = Path(config.dry_run_dir)
    _claim_root(root, config.output_dir)
    plan = Plan(type(config).__name__, root, config.output_dir)
    names = {f.name for f in dataclasses.fields(config)}
    _set(config, plan, "output_dir", str(mirror(root, config.output_dir)))
    if "pipeline" in names and config.pipeline:
        class_name, folder = replica_pipeline(root, config.pipeline)
        plan.built.append({"role": "pipeline", "replaces": config.pipeline, "class": class_name})
        _set(config, plan, "pipeline", str(folder))
    if "torch_dtype" in names:
        _set(config, plan, "torch_dtype", cpu_dtype(config.torch_dtype))
    _replace_judges(config, plan, names)
    _mirror_inputs(config, plan, names)
    _trim_prompts(config, plan, names)
    for name, cut in CUTS.items():
        if name in names:
            _set(config, plan, name, cut(getattr(config, name)))
    if isinstance(config.seed, list):  # generate's seeds
        _set(config, plan, "seed", config.seed[:2])
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = "offline"  # a dry run's tracker run stays on this machine
        plan.changed["WANDB_MODE"] = [None, "offline"]
    reset()
    _PLAN = plan
    logger.info("dry run: outputs go to %s; %s", config.output_dir, _summary(plan))
    return config


def cpu_dtype(dtype: str) -> str:
    """float16 becomes bfloat16 when no GPU is present: CPUs have no fast float16 kernels.

    Measured on a 2-core x86 CPU: 10 steps of the tiny UNet on 16 latents took 28 s in float16
    and 1.4 s in bfloat16 (2.0 s in float32), so a float16 dry run of a real recipe would take
    hours. bfloat16 keeps the half-precision code paths (casts, upcasts, autocast) exercised.
    """
    if dtype in ("float16", "fp16") and not torch.cuda.is_available():
        return "bfloat16"
    return dtype


def _summary(plan: Plan) -> str:
    built = ", ".join(f"{b['class']} for {b['replaces']}" for b in plan.built) or "no model"
    return f"tiny replicas: {built}"


def _judge_kwargs(plan: Plan, judge: str, kwargs: dict) -> dict:
    if judge == "openai":
        raise ConfigError(
            "dry run cannot replicate the 'openai' judge (a remote API); dry-run with judge "
            "'vlm' or 'clip' and the same prompts instead"
        )
    if judge not in ("vlm", "clip") or "model" not in kwargs:
        return kwargs
    model_type, folder = replica_judge_model(plan.root, judge, kwargs["model"])
    plan.built.append({"role": f"judge {judge}", "replaces": kwargs["model"], "class": model_type})
    kwargs = {**kwargs, "model": str(folder)}
    if "torch_dtype" in kwargs:
        kwargs["torch_dtype"] = cpu_dtype(kwargs["torch_dtype"])
    return kwargs


def _replace_judges(config: Any, plan: Plan, names: set[str]) -> None:
    if "judges" in names:  # evaluate: judge_kwargs maps each judge name to its kwargs
        kwargs = {j: _judge_kwargs(plan, j, dict(k)) for j, k in config.judge_kwargs.items()}
        for judge in config.judges:
            _judge_kwargs(plan, judge, {})  # an API judge without kwargs is refused too
        _set(config, plan, "judge_kwargs", kwargs)
    elif "judge_kwargs" in names and config.judge:
        kwargs = _judge_kwargs(plan, config.judge, dict(config.judge_kwargs))
        _set(config, plan, "judge_kwargs", kwargs)


def _mirrored_input(plan: Plan, what: str, path: str) -> str:
    mirrored = mirror(plan.root, path)
    if not mirrored.exists():
        raise ConfigError(
            f"dry run: {what} '{path}' is read from '{mirrored}', which no dry run wrote; "
            "dry-run the stage that writes it first, with the same --dry_run_dir"
        )
    return str(mirrored)


def _mirror_inputs(config: Any, plan: Plan, names: set[str]) -> None:
    from ..rewards import ARCHITECTURES  # here: noisealign.rewards imports this module

    for name in INPUT_FOLDERS:
        value = getattr(config, name) if name in names else None
        if not value or (name == "reward_model" and value in ARCHITECTURES):
            continue  # distill's reward_model names an architecture, not a folder
        _set(config, plan, name, _mirrored_input(plan, name, value))
    if "methods" in names:  # evaluate: policy folders of the methods
        methods = {}
        for label, spec in config.methods.items():
            if spec.get("policy"):
                policy = _mirrored_input(plan, f"method '{label}' policy", spec["policy"])
                spec = {**spec, "policy": policy}
            methods[label] = spec
        _set(config, plan, "methods", methods)


def trimmed_prompt_file(root: Path, path: str) -> str:
    """A copy of a prompt file with the first :data:`PROMPTS_PER_SPLIT` rows of each split."""
    source = Path(path)
    if not source.is_file() or source.suffix.lower() not in (".jsonl", ".txt"):
        return path  # a dataset folder or CSV is read whole (stages still cut seeds and steps)
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept, per_split = [], {}
    for line in lines:
        split = None
        if source.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
                split = row.get("split") if isinstance(row, dict) else None
            except json.JSONDecodeError:
                pass  # left for the stage to report with its line number
        per_split[split] = per_split.get(split, 0) + 1
        if per_split[split] <= PROMPTS_PER_SPLIT:
            kept.append(line)
    target = mirror(root / "prompts", path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # ranks of one launch write the same text; the rename keeps each reader's file whole
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return str(target)


def _trim_prompts(config: Any, plan: Plan, names: set[str]) -> None:
    if "prompts" in names and config.prompts:
        _set(config, plan, "prompts", trimmed_prompt_file(plan.root, config.prompts))
    if "prompt_sets" in names:
        sets = {k: trimmed_prompt_file(plan.root, v) for k, v in config.prompt_sets.items()}
        _set(config, plan, "prompt_sets", sets)


__all__ = ["CUTS", "Plan", "mirror", "prepare", "reset", "track"]
