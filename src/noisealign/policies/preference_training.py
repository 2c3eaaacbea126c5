"""One step of train_projector: fresh noise keyed by the step, the quasi-DPO loss (or the
reward-gradient ablation) of the projector against its candidates, what the step logs, and the
standard-vs-projected image grid (the loop is :func:`noisealign.training.train`).

Every step's prompts and noises come from (recipe seed, step, position in the global batch)
(:func:`~noisealign.policies.training.step_keys`), so a resumed run and a run on any number of
processes see the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpointing import gathered_copy
from ..losses.preference import gaussianity_penalty, quasi_dpo_loss, reward_gradient_loss
from ..noise import batch_noise
from ..pipelines import PromptEmbeddings
from ..training import StepRecord
from .candidates import draw_candidates
from .training import comparison_grid, make_pairs, noise_metrics, repeat, reward_logits, step_keys


def step_loss(config, model, reward_model, pipe, emb, noise, ids, seeds, source):
    """Loss and metrics of one step on this process's samples (formulas: losses.preference).

    π_ref's mean is the identity (ε itself); ``source`` is the
    :class:`~noisealign.policies.candidates.CandidateSource` of the K candidates.
    """
    projected = model(noise, emb.embeds, emb.mask, emb.pooled)
    metrics: dict[str, float] = {}
    if config.loss_type == "reward_gradient":
        loss, metrics = reward_gradient_loss(reward_logits(reward_model, projected, emb, pipe))
    else:
        with torch.no_grad():
            k = config.num_candidates
            cands = draw_candidates(source, noise, ids, seeds, k, config.candidate_gamma)
            if config.rank_by == "verdicts":  # of the images the candidates mixed in
                scores = source.verdicts(ids, seeds, k).to(noise.device)
            else:
                scores = reward_logits(reward_model, cands.flatten(0, 1), repeat(emb, k), pipe)
        b, win, lose = make_pairs(scores.view(-1, k), config.pair_mode)
        if len(b):
            loss, metrics = quasi_dpo_loss(
                projected[b],
                noise[b],
                cands[b, win],
                cands[b, lose],
                sigma=config.sigma,
                beta=config.beta,
                loss_type=config.loss_type,
                rpo_alpha=config.rpo_alpha,
            )
        else:  # no pair of distinct scores: only the penalty acts (the graph stays connected)
            loss = projected.sum() * 0.0
        metrics["candidates/spread"] = (
            (scores.view(-1, k).amax(1) - scores.view(-1, k).amin(1)).mean().item()
        )
    penalty, gauss = gaussianity_penalty(projected)
    loss = loss + config.gaussianity_weight * penalty
    return loss, projected.detach(), {**metrics, **gauss}


@torch.no_grad()
def monitor(reward_model, pipe, emb, noise, projected) -> dict[str, float]:
    """r_φ(ε′) vs r_φ(ε) and ε′'s Gaussian statistics (logged, not optimised)."""
    r_projected = reward_logits(reward_model, projected, emb, pipe)
    r_noise = reward_logits(reward_model, noise, emb, pipe)
    return {
        "reward/projected": r_projected.mean().item(),
        "reward/standard": r_noise.mean().item(),
        "reward/gain": (r_projected - r_noise).mean().item(),
        "reward/win_rate": (r_projected > r_noise).float().mean().item(),
        **noise_metrics(projected, "eps_prime"),
        "eps_prime/distance": (projected - noise).flatten(1).norm(dim=1).mean().item(),
    }


def log_images(accelerator, config, projector, pipe, judge, shape, step: int) -> None:
    """Standard-vs-projected grid of the fixed prompts and seeds: PNG in output_dir/images, and
    wandb."""
    prompts = [p for p in config.image_prompts for _ in config.image_seeds]
    seeds = [s for _ in config.image_prompts for s in config.image_seeds]
    grid, scores = comparison_grid(
        pipe,
        projector,
        prompts,
        seeds,
        judge,
        config.num_inference_steps,
        config.guidance_scale,
        shape,
    )
    folder = Path(config.output_dir, "images")
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    accelerator.log(scores, step=step)
    if config.report_to == "wandb":
        import wandb  # only when logging to wandb: it is slow to import

        tracker = accelerator.get_tracker("wandb", unwrap=True)
        tracker.log({"images/standard_vs_projected": wandb.Image(grid)}, step=step)


@dataclass
class ProjectorStep:
    """train_projector's batches (keyed by the step), forward, log and image-grid hook.

    ``table``: the prompts' float32 embeddings on the training device; ``source``: where the
    candidates' fields come from; ``judge`` scores the image grid (or None).
    """

    accelerator: Any
    config: Any
    model: Any
    reward_model: Any
    pipe: Any
    table: PromptEmbeddings
    prompt_ids: list[str]
    shape: tuple[int, int, int]
    source: Any
    judge: Any
    projected: torch.Tensor | None = None

    def batch_for(self, step: int) -> dict[str, Any]:
        """This process's prompts, embeddings and fresh noises of ``step``."""
        accelerator, config = self.accelerator, self.config
        keys = step_keys(
            len(self.prompt_ids),
            step,
            config.batch_size,
            config.seed,
            accelerator.process_index,
            accelerator.num_processes,
        )
        ids = [self.prompt_ids[i] for i in keys.prompt_index]
        emb = self.table.select(keys.prompt_index)
        noise = batch_noise(ids, keys.seeds, self.shape).to(accelerator.device)
        return {"ids": ids, "seeds": keys.seeds, "emb": emb, "noise": noise}

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, self.projected, metrics = step_loss(
            self.config,
            self.model,
            self.reward_model,
            self.pipe,
            batch["emb"],
            batch["noise"],
            batch["ids"],
            batch["seeds"],
            self.source,
        )
        return loss, metrics

    def log(self, record: StepRecord) -> dict[str, float] | None:
        """Every ``logging_steps`` and at the last step: loss, metrics and r_φ's view of ε′."""
        step, config = record.step, self.config
        if step % config.logging_steps != 0 and step != config.max_steps:
            return None
        mean_loss = self.accelerator.reduce(record.loss.detach(), reduction="mean").item()
        logged = {"step": step, "loss": mean_loss, "lr": record.lr}
        logged["grad_norm"] = float(record.grad_norm)
        logged |= record.metrics
        emb, noise = record.batch["emb"], record.batch["noise"]
        logged |= monitor(self.reward_model, self.pipe, emb, noise, self.projected)
        self.accelerator.log(logged, step=step)
        record.progress.set_postfix(loss=f"{mean_loss:.4f}", gain=f"{logged['reward/gain']:.3f}")
        return logged

    def images(self, step: int) -> None:
        """The image-grid hook: every process gathers (FSDP shards), the main one draws."""
        projector = gathered_copy(self.accelerator, self.model)
        if projector is not None:
            projector.to(self.accelerator.device)
            log_images(
                self.accelerator, self.config, projector, self.pipe, self.judge, self.shape, step
            )
        self.accelerator.wait_for_everyone()
