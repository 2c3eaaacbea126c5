"""The one training loop of every training stage, and the recipe fields those stages share.

A stage hands :func:`train` a :class:`TrainParts`: the prepared model, optimizer and scheduler,
a ``step(batch) -> (loss, metrics)`` callable, a data source, and what to log, run and save
after each optimizer step. The loop owns the rest: gradient accumulation, clipping, the
progress bar, ``save_state`` checkpoints (:mod:`noisealign.checkpointing`) and the counters a
resume replays from.

A resumed run replays exactly: epoch batches depend only on (seed, epoch)
(``PromptBatchSampler``) and step-keyed batches only on the step, ``save_state`` stores
model, optimizer, scheduler, RNG and the accumulation counter, and ``trainer_state.json``
records how many batches were consumed, so the first batch after a resume is the one the
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .checkpointing import gathered_copy, load_checkpoint, model_config, save_checkpoint
from .configs import DocumentedFields, arg

if TYPE_CHECKING:  # accelerate and torch load with the first stage that trains
    import torch
    from accelerate import Accelerator


@dataclass
class TrainerSettings(DocumentedFields):
    """Recipe fields every training stage shares: a stage config lists it before ``BaseConfig``
    among its bases; a stage with another default redeclares the field with
    :func:`trainer_default`."""

    learning_rate: float = arg(1e-4, min=0, min_exclusive=True)
    """AdamW learning rate, reached after the warm-up (constant from then on)."""
    weight_decay: float = arg(0.0, min=0)
    """AdamW weight decay."""
    warmup_steps: int = arg(0, min=0)
    """Linear warm-up steps."""
    max_grad_norm: float = arg(1.0, min=0)
    """Gradient clipping norm; 0 turns clipping off."""
    logging_steps: int = arg(10, min=1)
    """Log train metrics every this many steps."""
    save_steps: int = arg(500, min=1)
    """Checkpoint (accelerate save_state) every this many steps, and at the end."""
    save_total_limit: int = arg(2, min=0)
    """Checkpoints kept (0 keeps all)."""
    resume_from_checkpoint: str | None = None
    """'latest' or a checkpoint folder to resume from."""


def trainer_default(name: str, default: Any) -> Any:
    """The :class:`TrainerSettings` field ``name`` with a stage's own default, its limits and help
    kept (a docstring under the redeclared field replaces the help)."""
    base = TrainerSettings.__dataclass_fields__[name]
    return dataclasses.field(default=default, metadata=base.metadata)


# ---- what a stage hands the loop -----------------------------------------------------
@dataclass
class EpochData:
    """Epochs of a prepared ``loader`` whose batch ``sampler`` reshuffles per ``use_epoch``."""

    loader: Any
    sampler: Any


@dataclass
class StepRecord:
    """One optimizer step as the stage's ``log`` sees it (``loss``: the last forward's)."""

    step: int
    epoch: int | None
    loss: torch.Tensor
    metrics: dict[str, float]
    grad_norm: torch.Tensor | None
    batch: Any
    progress: Any
    lr: float  # the learning rate the step used


@dataclass
class Checkpointing:
    """``save_state`` every ``every`` steps and at the end into ``output_dir/checkpoints``."""

    output_dir: str
    model_config: dict
    every: int
    keep: int

    @classmethod
    def of(cls, accelerator: Accelerator, config: Any, model: Any) -> Checkpointing:
        """The plan of a :class:`TrainerSettings` recipe for the prepared ``model``."""
        saved = model_config(accelerator, model)
        return cls(config.output_dir, saved, config.save_steps, config.save_total_limit)


@dataclass
class TrainParts:
    """Everything :func:`train` runs.

    ``model``: the prepared model, or a tuple of prepared models trained together.
    ``step``: one forward on a batch -> ``(loss, metrics)``; the loop runs the backward.
    ``data``: :class:`EpochData`, or ``batch_for(step)`` for batches keyed by the step.
    ``log``: called after every optimizer step; returns the history entry or None.
    ``hooks``: ``hook(step)`` after every optimizer step (e.g. :func:`every` evaluation).
    ``max_grad_norm``: clip to this norm (0: no clipping, ``inf``: only measure it).
    """

    model: Any
    optimizer: Any
    scheduler: Any
    step: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]
    data: EpochData | Callable[[int], Any]
    max_steps: int
    log: Callable[[StepRecord], dict | None]
    max_grad_norm: float = 0.0
    hooks: Sequence[Callable[[int], None]] = ()
    checkpoints: Checkpointing | None = None
    name: str = "train"


def every(
    steps: int, action: Callable[[int], None], before: int | None = None
) -> Callable[[int], None]:
    """A hook running ``action(step)`` every ``steps`` steps (never for 0), below ``before``."""

    def hook(step: int) -> None:
        if steps > 0 and step % steps == 0 and (before is None or step < before):
            action(step)

    return hook


# ---- the loop ------------------------------------------------------------------------
def train(accelerator: Accelerator, parts: TrainParts, state: dict) -> list[dict]:
    """Optimizer steps from ``state`` (``{"step", "batches"}``, updated in place) to
    ``parts.max_steps``; returns the history entries ``parts.log`` kept."""
    models = parts.model if isinstance(parts.model, tuple) else (parts.model,)
    history: list[dict] = []
    progress = tqdm(
        total=parts.max_steps,
        initial=state["step"],
        desc=parts.name,
        disable=not accelerator.is_local_main_process,
    )
    for model in models:
        model.train()
    batches = _batches(accelerator, parts.data, state)
    while state["step"] < parts.max_steps:
        batch, epoch = next(batches)
        with accelerator.accumulate(*models):
            loss, metrics = parts.step(batch)
            accelerator.backward(loss)
            grad_norm = _clip(accelerator, models, parts.max_grad_norm)
            lr = parts.optimizer.param_groups[0]["lr"]
            parts.optimizer.step()
            parts.scheduler.step()
            parts.optimizer.zero_grad()
        state["batches"] += 1
        if not accelerator.sync_gradients:
            continue
        state["step"] += 1
        progress.update(1)
        entry = parts.log(
            StepRecord(state["step"], epoch, loss, metrics, grad_norm, batch, progress, lr)
        )
        if entry is not None:
            history.append(entry)
        for hook in parts.hooks:
            hook(state["step"])
        plan = parts.checkpoints
        if plan and (state["step"] % plan.every == 0 or state["step"] == parts.max_steps):
            save_checkpoint(accelerator, plan.output_dir, state, plan.model_config, plan.keep)
    batches.close()
    progress.close()
    return history


def _batches(accelerator: Accelerator, data: Any, state: dict) -> Iterator[tuple[Any, Any]]:
    """``(batch, epoch)`` from where ``state`` stands: step-keyed, or epochs resumed mid-way."""
    if not isinstance(data, EpochData):
        while True:
            yield data(state["step"]), None
    per_epoch = len(data.loader)
    while True:
        epoch, skip = divmod(state["batches"], per_epoch)
        data.sampler.use_epoch(epoch)
        loader = accelerator.skip_first_batches(data.loader, skip) if skip else data.loader
        for batch in loader:
            yield batch, epoch


def _clip(accelerator: Accelerator, models: tuple, max_norm: float) -> torch.Tensor | None:
    """Clip the gradients of ``models`` (together) on an optimizer step; their total norm."""
    if not accelerator.sync_gradients or max_norm <= 0:
        return None
    return accelerator.clip_grad_norm_([p for m in models for p in m.parameters()], max_norm)


# ---- start and finish ----------------------------------------------------------------
def start_state(
    accelerator: Accelerator, config: Any, resume: Path | None, plan: Checkpointing
) -> dict:
    """The counters to start from: the checkpoint's when resuming; else zero, after
    ``overwrite_output_dir`` has removed the earlier run's checkpoints."""
    state = {"step": 0, "batches": 0}
    if resume is not None:
        state = load_checkpoint(accelerator, resume, plan.model_config)
    elif config.overwrite_output_dir and accelerator.is_main_process:
        shutil.rmtree(Path(config.output_dir, "checkpoints"), ignore_errors=True)
    accelerator.wait_for_everyone()
    return state


def save_final(accelerator: Accelerator, model: Any, save: Callable[[Any], None]) -> None:
    """``save(copy)`` of the trained ``model``'s gathered copy on the main process; all wait."""
    trained = gathered_copy(accelerator, model)  # every process: FSDP gathers shards
    if trained is not None:
        save(trained)
    accelerator.wait_for_everyone()
