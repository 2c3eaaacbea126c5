"""Checkpoints of the training stages: ``output_dir/checkpoints/checkpoint-<step>`` folders.

Each holds accelerate's ``save_state`` (model, optimizer, scheduler, RNG, the accumulation
counter) and, written last, ``trainer_state.json``: the step, the batches consumed and the
model config the checkpoint belongs to. :mod:`noisealign.training` saves and resumes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError
from .outputs import lock_output_dir

if TYPE_CHECKING:  # accelerate loads torch: it comes with the first stage that trains
    from accelerate import Accelerator

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``output_dir/checkpoints/checkpoint-<step>`` folders, oldest first.

    ``trainer_state.json`` is written last (:func:`save_checkpoint`), so a folder without it
    is a save that was killed midway: it is skipped, and rewritten when the run gets there.
    """
    root = Path(output_dir, "checkpoints")
    found = [
        p
        for p in root.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix two runs' checkpoints unless resuming or overwriting (nothing is deleted here),
    then lock ``output_dir`` against a concurrent run (:func:`noisealign.outputs.lock_output_dir`).

    Every process calls it; only the main one takes the lock, so the ranks of one launch share
    the folder (they write checkpoints only after ``accelerator.prepare``, a collective that
    the main process reaches after the lock).
    """
    from accelerate import PartialState  # the one lazy import: accelerate loads torch

    if checkpoints(output_dir) and not resume and not overwrite:
        raise DataError(
            f"output_dir '{output_dir}' holds checkpoints of an earlier run; pass "
            "--resume_from_checkpoint latest, --overwrite_output_dir true, or another output_dir"
        )
    if PartialState().is_main_process:
        lock_output_dir(output_dir)


def resolve_checkpoint(output_dir: str, resume: str | None) -> Path | None:
    """The folder to resume from: ``"latest"`` (None if there is none yet) or an explicit path."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            logger.warning("no checkpoint in %s/checkpoints; starting from scratch", output_dir)
        return found[-1] if found else None
    if not Path(resume).is_dir():
        raise DataError(
            f"checkpoint '{resume}' does not exist; pass --resume_from_checkpoint latest or a "
            "checkpoint-<step> folder"
        )
    return Path(resume)


def read_checkpoint_state(path: Path, model_config: dict) -> dict:
    """Its ``trainer_state.json``; :class:`DataError` when corrupt or written for another model."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        step, batches, saved = state["step"], state["batches"], state["model_config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f"checkpoint '{path}' is corrupt (unreadable {STATE_FILE}); delete it or resume from "
            "another one"
        ) from exc
    if saved != json.loads(json.dumps(model_config)):
        diff = sorted(
            k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k)
        )
        raise DataError(
            f"checkpoint '{path}' is from another architecture (differs in: {', '.join(diff)}); "
            "resume with the recipe that wrote it or choose another output_dir"
        )
    return {"step": int(step), "batches": int(batches)}


def load_checkpoint(accelerator: Accelerator, path: Path, model_config: dict) -> dict:
    state = read_checkpoint_state(path, model_config)
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # safetensors, pickle and shape errors all mean "not this model"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"checkpoint '{path}' is corrupt or from another architecture ({first[:200]}); "
            "delete it or resume from another one"
        ) from exc
    logger.info("resumed from %s at step %d", path, state["step"])
    return state


def model_config(accelerator: Accelerator, model: Any) -> dict:
    """The prepared ``model``'s config as plain JSON values (what a checkpoint must match)."""
    return json.loads(json.dumps(dataclasses.asdict(accelerator.unwrap_model(model).config)))


def gathered_copy(accelerator: Accelerator, model: Any) -> Any:
    """A plain eval-mode copy of the prepared ``model`` with its full weights on the main process
    (None elsewhere), for ``save_pretrained``.

    Every process must call it: under FSDP the parameters are shards, and
    ``accelerator.get_state_dict`` gathers them (a collective) into a full state dict on the
    main process; saving the prepared module itself would write one shard.
    """
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    unwrapped = accelerator.unwrap_model(model)
    # FSDP2's wrapper class builds the original class (FSDPModule.__new__)
    copy_ = type(unwrapped)(unwrapped.config)
    copy_.load_state_dict(state_dict)
    return copy_.eval()


def save_checkpoint(
    accelerator: Accelerator, output_dir: str, state: dict, model_config: dict, limit: int
) -> None:
    path = Path(output_dir, "checkpoints", f"checkpoint-{state['step']}")
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        payload = {**state, "model_config": model_config}
        # tmp + rename: a signal mid-write never leaves an empty state that refuses the resume
        tmp = path / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(payload, indent=2, default=str))
        tmp.replace(path / STATE_FILE)
        for old in checkpoints(output_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
