"""``noisealign dry_run_chain RECIPE_FOLDER``: dry-run every stage recipe of a folder, in order.

Each stage reads the previous stages' dry-run outputs (they share ``--dry_run_dir``), exactly
as the real chain reads the real outputs. With ``--num_processes N`` (N > 1) each stage is
started through ``accelerate launch``; without a GPU as N CPU processes (gloo). With one
process the stages run one after the other in this process.

Example:
    noisealign dry_run_chain recipes/sd15
    noisealign dry_run_chain recipes/sdxl --num_processes 2 --dry_run_dir /tmp/dry_run
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..cli import STAGES, run_stage
from ..errors import ConfigError

logger = logging.getLogger("noisealign.dry_run")

# the order in which a chain's stages read each other's outputs
STAGE_ORDER = (
    "collect",
    "collect_npd",
    "image_npd",
    "distill",
    "train_npnet",
    "train_projector",
    "evaluate",
    "generate",
)


# stages that refuse more than one process (each would write the whole dataset)
SINGLE_PROCESS = ("image_npd",)


def chain(folder: str | Path) -> list[Path]:
    """The stage recipes of ``folder`` (``<stage>.yaml``) in :data:`STAGE_ORDER`."""
    folder = Path(folder)
    recipes = [folder / f"{stage}.yaml" for stage in STAGE_ORDER]
    recipes = [r for r in recipes if r.is_file()]
    if not recipes:
        raise ConfigError(
            f"'{folder}' holds no stage recipe ({', '.join(s + '.yaml' for s in STAGE_ORDER)}); "
            "pass a recipe folder such as recipes/sd15"
        )
    return recipes


def stage_command(recipe: Path, num_processes: int, port: int) -> list[str]:
    """The command that dry-runs one stage recipe with ``num_processes`` processes."""
    script = Path(__file__).resolve().parents[1] / f"{recipe.stem}.py"
    if num_processes == 1:
        return [sys.executable, str(script)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", str(num_processes), "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port)]
    return [*launch, str(script)]


def _run_here(stage: str, args: list[str]) -> bool:
    """Run one stage in this process, as the console command would; True when it succeeded."""
    try:
        run_stage(importlib.import_module(STAGES[stage]).main, args)
    except SystemExit as exc:  # run_stage exits 2 on a user error, after logging it
        return exc.code in (0, None)
    return True


def run_chain(
    folder: str | Path, dry_run_dir: str, num_processes: int = 1, port: int = 29533
) -> list[float]:
    """Dry-run each stage of ``folder``; returns the seconds each took. Stops at the first
    failure."""
    env = dict(os.environ)
    if num_processes > 1 and "CUDA_VISIBLE_DEVICES" not in env:
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "1"
    seconds = []
    for recipe in chain(folder):
        processes = 1 if recipe.stem in SINGLE_PROCESS else num_processes
        args = ["--config", str(recipe), "--dry_run", "true", "--dry_run_dir", dry_run_dir]
        logger.info("dry run %s (%d process%s)", recipe, processes, "es" * (processes > 1))
        started = time.perf_counter()
        if num_processes == 1:
            ok = _run_here(recipe.stem, args)  # one process: no interpreter start per stage
        else:
            command = [*stage_command(recipe, processes, port), *args]
            ok = subprocess.run(command, env=env).returncode == 0
        if not ok:
            raise ConfigError(f"the dry run of {recipe} failed (see above); fix it and rerun")
        seconds.append(time.perf_counter() - started)
    return seconds


def main(args: Sequence[str] | None = None) -> None:
    description = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="noisealign dry_run_chain", description=description)
    parser.add_argument("folder", help="recipe folder, e.g. recipes/sd15")
    parser.add_argument("--num_processes", type=int, default=1, help="processes per stage")
    parser.add_argument("--dry_run_dir", default="dry_run", help="folder the dry runs share")
    parser.add_argument("--main_process_port", type=int, default=29533, help="for N > 1")
    options = parser.parse_args(args)
    if options.num_processes < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {options.num_processes}")
    seconds = run_chain(
        options.folder, options.dry_run_dir, options.num_processes, options.main_process_port
    )
    took = ", ".join(f"{s:.0f} s" for s in seconds)
    logger.info("dry-run chain of %s passed: %s", options.folder, took)


if __name__ == "__main__":
    run_stage(main)
