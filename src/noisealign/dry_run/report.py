"""The report a dry run ends with: replicas built, models per rank, peak memory, outputs read
back."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from diffusers import DiffusionPipeline
from safetensors.torch import load_file
from torch import nn

from .. import dry_run
from ..errors import NoiseAlignError
from ..policies import load_policy
from ..rewards import load_reward_model
from . import Plan, mirror
from .replicas import slug

logger = logging.getLogger("noisealign.dry_run")

PIPELINE_PARTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
RANK_TIMEOUT = 300.0  # seconds the main process waits for the other ranks' summaries


class DryRunFailure(NoiseAlignError):
    """A dry run whose outputs did not read back (missing, empty or non-finite)."""


def _device(device: torch.device) -> str:
    """``cuda:1`` stays; every CPU device is ``cpu`` (accelerate calls it ``cpu:0`` on every
    rank)."""
    return "cpu" if device.type == "cpu" else str(device)


def _module(role: str, cls: str, module: nn.Module) -> dict[str, str]:
    param = next(module.parameters(), None)
    dtype, device = (str(param.dtype), _device(param.device)) if param is not None else ("-", "-")
    return {"role": role, "class": cls, "dtype": dtype.removeprefix("torch."), "device": device}


def describe(role: str, obj: Any) -> list[dict[str, str]]:
    """Class, dtype and device of a tracked pipeline, judge or model."""
    if isinstance(obj, DiffusionPipeline):
        parts = [(name, getattr(obj, name, None)) for name in PIPELINE_PARTS]
        return [
            _module(f"{role}.{name}", f"{type(obj).__name__}.{type(m).__name__}", m)
            for name, m in parts
            if isinstance(m, nn.Module)
        ]
    if isinstance(obj, nn.Module):
        return [_module(role, type(obj).__name__, obj)]
    model = getattr(obj, "model", None)  # VLMJudge / CLIPJudge hold their transformers model
    if isinstance(model, nn.Module):
        return [_module(role, f"{type(obj).__name__}.{type(model).__name__}", model)]
    return [{"role": role, "class": type(obj).__name__, "dtype": "-", "device": "-"}]


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory when a GPU was used."""
    peak = {"cpu_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def _check_safetensors(path: Path) -> tuple[str, str | None]:
    tensors = load_file(path)
    values = sum(t.numel() for t in tensors.values())
    finite = all(torch.isfinite(t.float()).all() for t in tensors.values())
    line = f"{path}: {len(tensors)} tensors, {values:,} values"
    if not tensors:
        return line, f"{path} holds no tensor"
    return line + ("" if finite else ", NOT FINITE"), None if finite else f"{path} is not finite"


def _load_folder(folder: Path) -> str:
    """Load a saved reward model or policy folder with the loaders later stages use."""
    config = json.loads((folder / "config.json").read_text())
    if "architecture" in config:
        return type(load_reward_model(str(folder))).__name__
    if "policy_type" in config or "pipeline_signature" in config:
        return type(load_policy(str(folder))).__name__
    return "an unknown folder (not checked)"


def check_outputs(folder: Path) -> tuple[list[str], list[str]]:
    """Read back what the stage wrote: datasets (rows), safetensors (finite), reports,
    checkpoints."""
    lines, problems = [], []
    if not folder.is_dir():
        return lines, [f"the stage wrote no output folder {folder}"]
    for path in sorted(folder.rglob("*")):
        if "wandb" in path.parts:
            continue
        if path.is_dir() and (path / "dataset_info.json").is_file():
            rows = len(datasets.load_from_disk(str(path)))
            lines.append(f"{path}: dataset of {rows} rows")
            if rows == 0:
                problems.append(f"{path} holds no row")
        elif path.suffix == ".safetensors" and "checkpoint" not in path.parent.name:
            line, problem = _check_safetensors(path)
            lines.append(line)
            problems += [problem] if problem else []
        elif path.name == "config.json" and (path.parent / "model.safetensors").is_file():
            lines.append(f"{path.parent}: loads as {_load_folder(path.parent)}")
        elif path.name in ("report.json", "metrics.json"):
            json.loads(path.read_text())
            lines.append(f"{path}: valid JSON")
    checkpoints = sorted(p.name for p in folder.rglob("checkpoint-*") if p.is_dir())
    if checkpoints:
        lines.append(f"{folder}: checkpoints {', '.join(checkpoints)}")
    images = len(list(folder.rglob("*.png")))
    if images:
        lines.append(f"{folder}: {images} PNG images")
    if not lines:
        problems.append(f"{folder} holds no dataset, weights or report")
    return lines, problems


def report() -> dict[str, Any] | None:
    """Gather every rank's models and memory; the main process logs and saves the report.

    Called by :func:`noisealign.cli.run_stage` after the stage returned (a no-op outside a
    dry run). Raises :class:`DryRunFailure` when an output does not read back.
    """
    if dry_run._PLAN is None:  # read at call time: prepare() sets them
        return None
    try:
        return _report(dry_run._PLAN, dry_run._TRACKED)
    finally:
        dry_run.reset()


def rank_summary(tracked: list[tuple[str, Any]]) -> dict[str, Any]:
    """This process's rank, device, tracked models and peak memory."""
    state = PartialState()
    return {
        "rank": state.process_index,
        "device": _device(state.device),
        "models": [m for role, obj in tracked for m in describe(role, obj)],
        "peak_memory": peak_memory_mb(),
    }


def gather_ranks(plan: Plan, mine: dict[str, Any], timeout: float = RANK_TIMEOUT) -> list[dict]:
    """Every rank's :func:`rank_summary`, through files: the main process waits for the others.

    Files, not a collective: a stage may end its process group before the report, and an
    extra collective would change the stage's own sequence of them. Ranks of one launch share
    their parent process (the launcher), which keys the files.
    """
    state = PartialState()
    if state.num_processes == 1:
        return [mine]
    folder = plan.root / "reports" / ".ranks" / f"launch-{os.getppid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank-{state.process_index}.json"
    path.with_suffix(".tmp").write_text(json.dumps(mine))
    path.with_suffix(".tmp").replace(path)
    if not state.is_main_process:
        return []
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("rank-*.json"))) < state.num_processes:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ranks = [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))]
    shutil.rmtree(folder, ignore_errors=True)
    return sorted(ranks, key=lambda r: r["rank"])


def _report(plan: Plan, tracked: list[tuple[str, Any]]) -> dict[str, Any] | None:
    state = PartialState()
    ranks = gather_ranks(plan, rank_summary(tracked))
    if not state.is_main_process:
        return None
    output_dir = mirror(plan.root, plan.output_dir)
    outputs, problems = check_outputs(output_dir)
    missing = sorted(set(range(state.num_processes)) - {r["rank"] for r in ranks})
    problems += [f"rank {r} did not report within {RANK_TIMEOUT:.0f} s" for r in missing]
    result = {
        "stage": plan.stage,
        "recipe_output_dir": plan.output_dir,
        "output_dir": str(output_dir),
        "replicas": plan.built,
        "changed": plan.changed,
        "ranks": ranks,
        "outputs": outputs,
        "problems": problems,
    }
    path = plan.root / "reports" / f"{slug(os.path.relpath(output_dir, plan.root))}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    logger.info("%s", format_report(result, path))
    if problems:
        failed = "; ".join(problems)
        raise DryRunFailure(f"dry run of {plan.stage} failed its output checks: {failed}")
    return result


def format_report(result: dict[str, Any], path: Path) -> str:
    lines = [f"dry run of {result['stage']} finished; report saved to {path}"]
    for built in result["replicas"]:
        lines.append(f"  replica {built['role']}: tiny {built['class']} for {built['replaces']}")
    for name, (before, after) in result["changed"].items():
        if name not in ("pipeline", "judge_kwargs", "methods"):
            lines.append(f"  {name}: {before} -> {after}")
    for rank in result["ranks"]:
        memory = ", ".join(f"{k} {v:.0f}" for k, v in rank["peak_memory"].items())
        lines.append(f"  rank {rank['rank']} on {rank['device']} (peak {memory}):")
        for m in rank["models"]:
            lines.append(f"    {m['role']}: {m['class']} {m['dtype']} on {m['device']}")
    lines += [f"  checked {line}" for line in result["outputs"]]
    return "\n".join(lines)
