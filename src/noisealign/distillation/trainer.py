"""The distill training loop: steps, held-out evaluation, accelerate checkpoints and resume.

A resumed run replays exactly: batches depend only on (seed, epoch) (``PromptBatchSampler``),
``save_state`` stores model, optimizer, scheduler, RNG and the accumulation counter, and
``trainer_state.json`` records how many batches were consumed, so the first batch after a
resume is the one the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import DataError
from ..losses.reward import reward_loss
from .metrics import reward_metrics

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"


@dataclass
class PromptTable:
    """Per-prompt conditioning on the training device: embeds (P, L, D), mask (P, L), pooled (P, P') or None."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None

    def gather(
        self, prompt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return (
            self.embeds[prompt],
            self.mask[prompt],
            None if self.pooled is None else self.pooled[prompt],
        )


@dataclass
class LossSettings:
    """Weights and options of :func:`noisealign.losses.reward.reward_loss`."""

    token_weight: float = 1.0
    overall_weight: float = 1.0
    rank_weight: float = 1.0
    overall_kind: str = "bce"
    rank_margin: float = 0.0


@dataclass
class Schedule:
    """When to stop, log, evaluate and checkpoint (in optimizer steps)."""

    max_steps: int
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int
    max_grad_norm: float


def batch_loss(model: Any, batch: dict, table: PromptTable, losses: LossSettings):
    """``(loss, metrics)`` of one batch (see :func:`reward_loss`)."""
    embeds, mask, pooled = table.gather(batch["prompt"])
    out = model(batch["inputs"], embeds, mask, pooled)
    return reward_loss(
        out.token_logits,
        out.overall_logit,
        batch["token_targets"],
        batch["token_mask"],
        batch["overall"],
        batch["prompt"],
        token_weight=losses.token_weight,
        overall_weight=losses.overall_weight,
        rank_weight=losses.rank_weight,
        overall_kind=losses.overall_kind,
        rank_margin=losses.rank_margin,
    )


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: Any, loader: DataLoader, table: PromptTable) -> dict:
    """Held-out metrics (token AUC, Spearman ρ, pairwise accuracy) of the whole eval set.

    Every process scores every held-out row (held-out sets are small), so no gather is needed
    and all ranks log the same numbers; the prepared model is called the same number of times
    on each rank, which FSDP's all-gathers need, and it autocasts like in training.
    """
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        embeds, mask, pooled = table.gather(batch["prompt"])
        out = model(batch["inputs"], embeds, mask, pooled)
        values = {
            "token_logits": out.token_logits,
            "overall_logit": out.overall_logit,
            "token_targets": batch["token_targets"],
            "token_mask": batch["token_mask"],
            "overall": batch["overall"],
            "prompt": batch["prompt"],
        }
        for key, value in values.items():
            parts.setdefault(key, []).append(
                value.float().cpu() if value.is_floating_point() else value.cpu()
            )
    model.train()
    p = {k: torch.cat(v) for k, v in parts.items()}
    return reward_metrics(
        p["token_logits"],
        p["overall_logit"],
        p["token_targets"],
        p["token_mask"],
        p["overall"],
        p["prompt"],
    )


# ---- checkpoints ---------------------------------------------------------------------
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
    from accelerate import PartialState

    from ..outputs import lock_output_dir

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
            f"checkpoint '{resume}' does not exist; pass --resume_from_checkpoint latest or a checkpoint-<step> folder"
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
            f"checkpoint '{path}' is corrupt (unreadable {STATE_FILE}); delete it or resume from another one"
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


# ---- the loop ------------------------------------------------------------------------
def train(
    accelerator: Accelerator,
    parts: dict[str, Any],
    table: PromptTable,
    losses: LossSettings,
    schedule: Schedule,
    state: dict,
    output_dir: str,
    model_config: dict,
) -> list[dict[str, float]]:
    """Run optimizer steps from ``state`` to ``schedule.max_steps``; returns per-step train metrics.

    ``parts``: the prepared ``model``, ``optimizer``, ``lr_scheduler``, ``train_loader``,
    ``eval_loader`` and the (unprepared) ``sampler`` whose epoch drives the shuffling.
    """
    model, optimizer, lr_scheduler = parts["model"], parts["optimizer"], parts["lr_scheduler"]
    per_epoch = len(parts["train_loader"])
    history: list[dict[str, float]] = []
    progress = tqdm(
        total=schedule.max_steps,
        initial=state["step"],
        desc="distill",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    while state["step"] < schedule.max_steps:
        epoch, skip = divmod(state["batches"], per_epoch)
        parts["sampler"].use_epoch(epoch)
        loader = parts["train_loader"]
        loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in loader:
            with accelerator.accumulate(model):
                loss, metrics = batch_loss(model, batch, table, losses)
                accelerator.backward(loss)
                if accelerator.sync_gradients and schedule.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), schedule.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            state["batches"] += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            progress.update(1)
            _after_step(accelerator, parts, table, schedule, state, metrics, history)
            if state["step"] % schedule.save_steps == 0 or state["step"] == schedule.max_steps:
                save_checkpoint(
                    accelerator, output_dir, state, model_config, schedule.save_total_limit
                )
            if state["step"] >= schedule.max_steps:
                break
    progress.close()
    return history


def _after_step(accelerator, parts, table, schedule, state, metrics, history) -> None:
    step = state["step"]
    metrics = {**metrics, "lr": parts["lr_scheduler"].get_last_lr()[0], "step": step}
    history.append(metrics)
    if step % schedule.logging_steps == 0 or step == 1:
        accelerator.log(
            {f"train/{k}": v for k, v in metrics.items() if not math.isnan(v)}, step=step
        )
    if schedule.eval_steps > 0 and step % schedule.eval_steps == 0 and step < schedule.max_steps:
        values = evaluate(accelerator, parts["model"], parts["eval_loader"], table)
        accelerator.log({f"eval/{k}": v for k, v in values.items()}, step=step)
        logger.info("step %d eval: %s", step, {k: round(v, 4) for k, v in values.items()})
