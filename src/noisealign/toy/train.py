"""Training data and VAE of the toy model: the ground-truth pool, the VAE fit, the latent scale.

The UNet and text encoder train in :mod:`noisealign.toy.unet_training`.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image
from tqdm.auto import tqdm

from ..training import StepRecord, TrainParts, train
from .grammar import all_prompts
from .judge import ShapesJudge
from .render import phrasings, render_prompt

logger = logging.getLogger(__name__)


@dataclass
class Pool:
    """Ground-truth training scenes: ``images`` ``(N, 3, 32, 32)`` uint8 and their phrasings."""

    images: torch.Tensor
    prompts: list[list[str]]


def build_pool(size: int, p_single: float, seed: int) -> Pool:
    """Render ``size`` random training scenes (held-out pairs never appear)."""
    rng = random.Random(seed)
    singles, pairs = all_prompts("single"), all_prompts("seen")
    chosen = [
        rng.choice(singles) if rng.random() < p_single else rng.choice(pairs) for _ in range(size)
    ]
    images = np.stack(
        [np.asarray(render_prompt(p, rng)) for p in tqdm(chosen, desc="render pool", mininterval=5)]
    )
    return Pool(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [phrasings(p) for p in chosen]
    )


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak (a multiplier of the peak lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class _VAEObjective(torch.nn.Module):
    """Reconstruction and KL in one ``forward``, so DDP sees (and syncs) one call per step."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return F.mse_loss(recon, x), posterior.kl().mean() / x[0].numel()


@dataclass
class VAEStep:
    """Batches of pool images (drawn with ``generator``), the forward and the log of
    :func:`train_vae`."""

    accelerator: Accelerator
    objective: _VAEObjective
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pool: Pool
    steps: int
    batch_size: int
    kl_weight: float
    generator: torch.Generator

    def batch_for(self, step: int) -> torch.Tensor:
        index = torch.randint(len(self.pool.images), (self.batch_size,), generator=self.generator)
        return to_model_range(self.pool.images[index]).to(self.accelerator.device)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mse, kl = self.objective(x)
        return mse + self.kl_weight * kl, {"vae/mse": mse.item(), "vae/kl": kl.item()}

    def log(self, record: StepRecord) -> None:
        """Every 50 steps and the last."""
        step = record.step - 1  # counted from 0
        if step % 50 == 0 or step == self.steps - 1:
            metrics = {**record.metrics, "vae/lr": self.scheduler.get_last_lr()[0]}
            self.accelerator.log(metrics, step=step)
            record.progress.set_postfix(mse=f"{record.metrics['vae/mse']:.4f}")


def train_vae(
    accelerator: Accelerator,
    vae: AutoencoderKL,
    pool: Pool,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
) -> AutoencoderKL:
    """Fit the autoencoder: MSE reconstruction + ``kl_weight`` * KL(q(z|x) || N(0, I)).

    The KL term is tiny (as in Stable Diffusion's VAE): it only keeps latents bounded; the
    latent scale is fixed afterwards by :func:`fit_scaling_factor`.
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, steps, steps // 20 + 1)
    )
    objective, optimizer, scheduler = accelerator.prepare(_VAEObjective(vae), optimizer, scheduler)
    generator = torch.Generator().manual_seed(1)
    step = VAEStep(accelerator, objective, scheduler, pool, steps, batch_size, kl_weight, generator)
    parts = TrainParts(
        objective,
        optimizer,
        scheduler,
        step,
        step.batch_for,
        steps,
        step.log,
        max_grad_norm=1.0,
        name="vae",
    )
    train(accelerator, parts, {"step": 0, "batches": 0})
    return vae


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, pool: Pool, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of the pool, ``(N, 4, 16, 16)`` each (sampled per UNet step)."""
    vae.eval()
    means, stds = [], []
    for start in range(0, len(pool.images), batch_size):
        dist = vae.encode(
            to_model_range(pool.images[start : start + batch_size]).to(vae.device)
        ).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, pool: Pool, count: int = 256) -> float:
    """Share of the first ``count`` pool scenes whose VAE reconstruction the judge fully accepts.

    The decoded images are what the judge will see, so anything short of ~1.0 here caps the
    alignment the whole model can reach.
    """
    x = to_model_range(pool.images[:count]).to(vae.device)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(p) for p in pixels]
    feedback = ShapesJudge().score(images, [p[0] for p in pool.prompts[:count]])
    return float(np.mean([f.overall for f in feedback]))


def fit_scaling_factor(vae: AutoencoderKL, means: torch.Tensor, stds: torch.Tensor) -> float:
    """Set ``vae.config.scaling_factor`` so that scaled latents have unit std, as SD's 0.18215
    does."""
    sample = means + stds * torch.randn_like(means)
    factor = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=factor)
    return factor
