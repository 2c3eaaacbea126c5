"""Accelerator and tracker set-up shared by every stage.

wandb writes into ``<output_dir>/wandb`` unless the user set the ``WANDB_*_DIR`` variables,
so an offline CPU run leaves nothing outside its output folder. Config values whose name
looks like a credential are never sent to a tracker.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .configs import BaseConfig

logger = logging.getLogger(__name__)

# WANDB_*_DIR values this module set, so a second stage in one process moves them to its folder
_WANDB_DIRS_SET: dict[str, str] = {}
_SECRET = re.compile(r"(api_?key|secret|password|token)$", re.IGNORECASE)


def redact(values: Any) -> Any:
    """A copy of ``values`` with credential-like keys replaced by ``"<redacted>"``."""
    if isinstance(values, dict):
        return {k: "<redacted>" if _SECRET.search(str(k)) else redact(v) for k, v in values.items()}
    if isinstance(values, list):
        return [redact(v) for v in values]
    return values


def apply_num_threads(config: BaseConfig) -> None:
    """Set torch's intra-op threads from the recipe's ``num_threads`` (unset: leave torch's
    default)."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)


def make_accelerator(config: BaseConfig, **kwargs: Any) -> Accelerator:
    """An ``Accelerator`` that will log to wandb (or nothing); trackers start with
    :func:`start_tracking`.

    Create it before touching the output folder: it sets up the process group, and
    ``PartialState()`` alone ignores ``ACCELERATE_USE_CPU`` and would see one process.
    """
    apply_num_threads(config)
    log_with = "wandb" if config.report_to == "wandb" else None
    accelerator = Accelerator(log_with=log_with, project_dir=config.output_dir, **kwargs)
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate turns FSDP on for GPU-like devices only; on CPU processes it runs DDP
        logger.warning(
            "the accelerate config asks for FSDP, but this run is %s (accelerate shards with "
            "FSDP on GPUs only): every process holds the whole model",
            accelerator.distributed_type.value,
        )
    return accelerator


def start_tracking(accelerator: Accelerator, config: BaseConfig, stage: str) -> None:
    """Start the trackers, after the recipe and output folder passed their checks."""
    if config.report_to == "wandb":
        wandb_dir = Path(config.output_dir, "wandb").resolve()
        wandb_dir.mkdir(parents=True, exist_ok=True)
        for var in (
            "WANDB_DIR",
            "WANDB_CACHE_DIR",
            "WANDB_DATA_DIR",
            "WANDB_CONFIG_DIR",
            "WANDB_ARTIFACT_DIR",
        ):
            # the user's own setting wins; ours from an earlier stage in this process does not
            if var not in os.environ or os.environ[var] == _WANDB_DIRS_SET.get(var):
                os.environ[var] = _WANDB_DIRS_SET[var] = str(wandb_dir)
        name = config.run_name or f"{stage}-{Path(config.output_dir).name}"
        accelerator.init_trackers(
            config.wandb_project,
            config={"stage": stage, **redact(config.to_dict())},
            init_kwargs={
                "wandb": {"name": name, "dir": os.environ["WANDB_DIR"], "job_type": stage}
            },
        )
