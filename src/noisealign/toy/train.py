"""Training loops of the toy model: the data pool, the VAE, and the UNet with its text encoder.

The UNet loss is v-prediction with min-SNR-gamma weighting:

    z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps,    v = sqrt(a_t) eps - sqrt(1 - a_t) z_0,
    L = E[ min(snr_t, gamma) / (snr_t + 1) * || v_theta(z_t, t, c) - v ||^2 ],  snr_t = a_t / (1 - a_t)

(Salimans & Ho 2022, "Progressive distillation", for v; Hang et al. 2023, "Efficient
diffusion training via min-SNR weighting", for the weight, whose v form is snr-clipped
over snr + 1). The prompt is replaced by "" with probability ``cfg_dropout`` so the same
network gives the unconditional branch of classifier-free guidance.
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
from tqdm.auto import tqdm

from .grammar import all_prompts
from .models import tokenize
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
    bar = tqdm(range(steps), desc="vae", disable=not accelerator.is_main_process, mininterval=5)
    for step in bar:
        index = torch.randint(len(pool.images), (batch_size,), generator=generator)
        x = to_model_range(pool.images[index]).to(accelerator.device)
        mse, kl = objective(x)
        loss = mse + kl_weight * kl
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            metrics = {
                "vae/mse": mse.item(),
                "vae/kl": kl.item(),
                "vae/lr": scheduler.get_last_lr()[0],
            }
            accelerator.log(metrics, step=step)
            bar.set_postfix(mse=f"{mse.item():.4f}")
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
    from PIL import Image

    from .judge import ShapesJudge

    x = to_model_range(pool.images[:count]).to(vae.device)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    images = [Image.fromarray(p) for p in pixels]
    feedback = ShapesJudge().score(images, [p[0] for p in pool.prompts[:count]])
    return float(np.mean([f.overall for f in feedback]))


def fit_scaling_factor(vae: AutoencoderKL, means: torch.Tensor, stds: torch.Tensor) -> float:
    """Set ``vae.config.scaling_factor`` so that scaled latents have unit std, as SD's 0.18215 does."""
    sample = means + stds * torch.randn_like(means)
    factor = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


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


def train_unet(
    accelerator: Accelerator,
    components: dict,
    latents: tuple[torch.Tensor, torch.Tensor],
    pool: Pool,
    run: UNetRun,
    seed: int,
    log_offset: int = 0,
) -> None:
    """Train UNet and text encoder jointly; leaves their EMA weights in ``components``.

    Metrics go to the trackers at ``log_offset + step`` (wandb drops steps that go back).
    """
    unet, text_encoder, tokenizer = (
        components["unet"],
        components["text_encoder"],
        components["tokenizer"],
    )
    scale = components["vae"].config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=run.lr, weight_decay=0.01)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_lr(s, run.steps, run.warmup)
    )
    unet, text_encoder, optimizer, lr_schedule = accelerator.prepare(
        unet, text_encoder, optimizer, lr_schedule
    )
    ema = EMA(
        [accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)], run.ema_decay
    )
    generator, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    means, stds = latents
    bar = tqdm(
        range(run.steps), desc="unet", disable=not accelerator.is_main_process, mininterval=5
    )
    for step in bar:
        index = torch.randint(len(means), (run.batch_size,), generator=generator)
        z0 = (
            means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        ) * scale
        prompts = [
            "" if rng.random() < run.cfg_dropout else rng.choice(pool.prompts[i])
            for i in index.tolist()
        ]
        ids = tokenize(tokenizer, prompts).to(accelerator.device)
        loss, metrics = v_loss(
            unet,
            text_encoder,
            components["scheduler"],
            z0.to(accelerator.device),
            ids,
            run.snr_gamma,
            generator,
        )
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        if step % 50 == 0 or step == run.steps - 1:
            accelerator.log(
                {**metrics, "unet/lr": lr_schedule.get_last_lr()[0]}, step=log_offset + step
            )
            bar.set_postfix(loss=f"{metrics['unet/loss']:.4f}")
    ema.copy_to([components["unet"], components["text_encoder"]])
