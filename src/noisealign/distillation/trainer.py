"""What the distill stage's training step computes: the loss of a batch, the held-out metrics,
and the record each optimizer step logs (the loop itself is :func:`noisealign.training.train`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..losses.reward import reward_loss
from ..pipelines import PromptEmbeddings
from ..rewards.metrics import reward_metrics
from ..training import StepRecord

logger = logging.getLogger(__name__)


@dataclass
class PromptTable:
    """Per-prompt conditioning on the training device: embeds (P, L, D), mask (P, L), pooled
    (P, P') or None."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None

    @classmethod
    def on(cls, table: PromptEmbeddings, device: torch.device) -> PromptTable:
        """The pipeline's prompt ``table`` moved to ``device``."""
        pooled = None if table.pooled is None else table.pooled.to(device)
        return cls(table.embeds.to(device), table.mask.to(device), pooled)

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


def log_heldout(
    accelerator: Accelerator,
    step: int,
    metrics: dict[str, float],
    baseline: dict[str, float],
    teacher: dict[str, float] | None,
) -> None:
    """The final held-out metrics of the model, the prompt-only baseline (and the teacher)."""
    accelerator.log(
        {f"eval/{k}": v for k, v in metrics.items()}
        | {f"baseline/{k}": v for k, v in baseline.items()}
        | {f"teacher/{k}": v for k, v in (teacher or {}).items()},
        step=step,
    )
    logger.info(
        "held-out metrics: %s (prompt-only baseline: %s)",
        {k: round(v, 4) for k, v in metrics.items()},
        {k: round(v, 4) for k, v in baseline.items()},
    )


@dataclass
class DistillStep:
    """The distill stage's forward on a batch, and what each optimizer step logs."""

    accelerator: Accelerator
    model: Any
    scheduler: Any
    table: PromptTable
    losses: LossSettings
    logging_steps: int

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return batch_loss(self.model, batch, self.table, self.losses)

    def log(self, record: StepRecord) -> dict[str, float]:
        """Every step's metrics go to the history; every ``logging_steps`` to the trackers."""
        step = record.step
        metrics = {**record.metrics, "lr": self.scheduler.get_last_lr()[0], "step": step}
        if step % self.logging_steps == 0 or step == 1:
            logged = {f"train/{k}": v for k, v in metrics.items() if not math.isnan(v)}
            self.accelerator.log(logged, step=step)
        return metrics

    def evaluation(self, loader: DataLoader) -> Any:
        """The hook that logs the held-out metrics of a step."""

        def hook(step: int) -> None:
            values = evaluate(self.accelerator, self.model, loader, self.table)
            self.accelerator.log({f"eval/{k}": v for k, v in values.items()}, step=step)
            logger.info("step %d eval: %s", step, {k: round(v, 4) for k, v in values.items()})

        return hook
