"""Training of the toy model's UNet and text encoder, jointly, on the VAE latents of the pool.

The loss is v-prediction with min-SNR-gamma weighting:

    z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps,    v = sqrt(a_t) eps - sqrt(1 - a_t) z_0,
    L = E[ min(snr_t, gamma) / (snr_t + 1) * || v_theta(z_t, t, c) - v ||^2 ],
    snr_t = a_t / (1 - a_t)

(Salimans & Ho 2022, "Progressive distillation", for v; Hang et al. 2023, "Efficient
diffusion training via min-SNR weighting", for the weight, whose v form is snr-clipped
over snr + 1). The prompt is replaced by "" with probability ``cfg_dropout`` so the same
network gives the unconditional branch of classifier-free guidance. The saved weights are
an exponential moving average of the trained ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ..training import StepRecord, TrainParts, train
from .models import tokenize
from .train import Pool, cosine_lr


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay.

    decay_k = min(decay, (1 + k) / (10 + k)), so early averages are not dominated by the
    random initialisation.
    """

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.modules, self.decay, self.step = modules, decay, 0
        self.shadow = [[p.detach().clone() for p in m.parameters()] for m in modules]

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        decay = min(self.decay, (1 + self.step) / (10 + self.step))
        for module, shadow in zip(self.modules, self.shadow):
            for s, p in zip(shadow, module.parameters()):
                s.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for module, shadow in zip(modules, self.shadow):
            for s, p in zip(shadow, module.parameters()):
                p.copy_(s)


def v_loss(
    unet,
    text_encoder,
    scheduler,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    snr_gamma: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The min-SNR-weighted v-prediction loss of the module docstring, on one batch."""
    alphas = scheduler.alphas_cumprod.to(latents.device)
    t = torch.randint(0, len(alphas), (len(latents),), generator=generator).to(latents.device)
    eps = torch.randn(latents.shape, generator=generator).to(latents.device)
    a_t = alphas[t].view(-1, 1, 1, 1)
    z_t = a_t.sqrt() * latents + (1 - a_t).sqrt() * eps
    v_target = a_t.sqrt() * eps - (1 - a_t).sqrt() * latents
    v_pred = unet(z_t, t, text_encoder(input_ids)[0]).sample
    snr = alphas[t] / (1 - alphas[t])
    weight = snr.clamp(max=snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(v_pred, v_target, reduction="none").mean(dim=(1, 2, 3))
    loss = (weight * per_sample).mean()
    return loss, {"unet/loss": loss.item(), "unet/v_mse": per_sample.mean().item()}


@dataclass
class UNetRun:
    """Settings of :func:`train_unet` (mirrors the recipe fields of the same names)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    cfg_dropout: float
    snr_gamma: float
    ema_decay: float


@dataclass
class UNetStep:
    """Batches (latents sampled from the pool's posteriors, phrasings with CFG dropout), the
    forward and the log of :func:`train_unet`; ``generator`` and ``rng`` drive every draw."""

    accelerator: Accelerator
    models: tuple[Any, Any]  # the prepared UNet and text encoder
    components: dict
    latents: tuple[torch.Tensor, torch.Tensor]
    pool: Pool
    run: UNetRun
    lr_schedule: Any
    log_offset: int
    generator: torch.Generator
    rng: random.Random

    def batch_for(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = self.latents
        generator, run, rng = self.generator, self.run, self.rng
        scale = self.components["vae"].config.scaling_factor
        index = torch.randint(len(means), (run.batch_size,), generator=generator)
        z0 = (
            means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        ) * scale
        prompts = [
            "" if rng.random() < run.cfg_dropout else rng.choice(self.pool.prompts[i])
            for i in index.tolist()
        ]
        ids = tokenize(self.components["tokenizer"], prompts).to(self.accelerator.device)
        return z0.to(self.accelerator.device), ids

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]):
        (z0, ids), (unet, text_encoder) = batch, self.models
        noise_schedule = self.components["scheduler"]
        return v_loss(
            unet, text_encoder, noise_schedule, z0, ids, self.run.snr_gamma, self.generator
        )

    def log(self, record: StepRecord) -> None:
        """Every 50 steps and the last, at ``log_offset + step`` (wandb drops steps that go
        back)."""
        step = record.step - 1  # counted from 0
        if step % 50 == 0 or step == self.run.steps - 1:
            metrics = {**record.metrics, "unet/lr": self.lr_schedule.get_last_lr()[0]}
            self.accelerator.log(metrics, step=self.log_offset + step)
            record.progress.set_postfix(loss=f"{record.metrics['unet/loss']:.4f}")


def train_unet(
    accelerator: Accelerator,
    components: dict,
    latents: tuple[torch.Tensor, torch.Tensor],
    pool: Pool,
    run: UNetRun,
    seed: int,
    log_offset: int = 0,
) -> None:
    """Train UNet and text encoder jointly; leaves their EMA weights in ``components``."""
    unet, text_encoder = components["unet"], components["text_encoder"]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, run.steps, run.warmup)
    )
    *models, optimizer, lr_schedule = accelerator.prepare(
        unet, text_encoder, optimizer, lr_schedule
    )
    ema = EMA([accelerator.unwrap_model(m) for m in models], run.ema_decay)
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    step = UNetStep(
        accelerator,
        tuple(models),
        components,
        latents,
        pool,
        run,
        lr_schedule,
        log_offset,
        generator,
        rng,
    )
    parts = TrainParts(
        step.models,
        optimizer,
        lr_schedule,
        step,
        step.batch_for,
        run.steps,
        step.log,
        max_grad_norm=1.0,
        hooks=[lambda _: ema.update()],
        name="unet",
    )
    train(accelerator, parts, {"step": 0, "batches": 0})
    ema.copy_to([unet, text_encoder])
