"""Stage 0 (toy world only): pretrain the toy text-to-image model and save it as a diffusers folder.

Renders a pool of ground-truth scenes, fits the VAE, encodes the pool once, then trains the
UNet and the text encoder jointly (v-prediction, min-SNR weighting, CFG dropout, EMA), and
saves a ``StableDiffusionPipeline`` folder that loads with plain ``from_pretrained``.

    accelerate launch src/noisealign/pretrain.py --config recipes/toy/pretrain.yaml
    python -m noisealign.pretrain --config recipes/tiny/pretrain.yaml --output_dir outputs/tiny
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, StableDiffusionPipeline

from noisealign.cli import run_stage
from noisealign.configs import BaseConfig, arg, parse_config
from noisealign.toy.evaluate import generate_and_judge, summarise
from noisealign.toy.grammar import prompt_records
from noisealign.toy.models import PRESETS, assemble_pipeline, build_components
from noisealign.toy.train import (
    Pool,
    build_pool,
    encode_pool,
    fit_scaling_factor,
    reconstruction_accuracy,
    train_vae,
)
from noisealign.toy.unet_training import UNetRun, train_unet
from noisealign.tracking import make_accelerator, start_tracking

logger = logging.getLogger("noisealign.pretrain")


@dataclass
class PretrainConfig(BaseConfig):
    """Recipe of the toy model's pretraining (see recipes/toy/pretrain.yaml)."""

    model_size: str = arg("toy", choices=tuple(PRESETS))
    """Architecture preset: 'toy' (the shipped model) or 'tiny' (tests)."""
    pool_size: int = arg(40000, min=1)
    """Ground-truth scenes rendered (and encoded once) for training."""
    p_single: float = arg(0.2, min=0, max=1, max_exclusive=True)
    """Share of one-object scenes in the pool; the rest are two-object training compositions."""
    vae_steps: int = arg(1500, min=1)
    """Optimiser steps of the VAE."""
    vae_batch_size: int = arg(64, min=1)
    """Images per VAE step."""
    vae_lr: float = arg(1e-3, min=0, min_exclusive=True)
    """Peak AdamW learning rate of the VAE (warm-up, cosine decay)."""
    vae_kl_weight: float = arg(1e-6, min=0)
    """Weight of the per-dimension KL term; tiny, as in SD's VAE."""
    unet_steps: int = arg(3200, min=1)
    """Optimiser steps of the UNet and text encoder."""
    unet_batch_size: int = arg(64, min=1)
    """Latents per UNet step."""
    unet_lr: float = arg(1e-3, min=0, min_exclusive=True)
    """Peak AdamW learning rate of UNet and text encoder."""
    unet_warmup_steps: int = arg(200, min=0)
    """Linear warm-up steps before the cosine decay."""
    cfg_dropout: float = arg(0.1, min=0, max=1, max_exclusive=True)
    """Probability of training on the empty prompt (classifier-free guidance)."""
    snr_gamma: float = arg(5.0, min=0, min_exclusive=True)
    """Clip of the min-SNR loss weight."""
    ema_decay: float = arg(0.999, min=0, max=1, max_exclusive=True)
    """EMA decay of the saved UNet and text-encoder weights."""
    eval_prompts: int = arg(16, min=0)
    """Held-out and seen prompts (each) of the closing check; 0 skips it."""
    eval_seeds: int = arg(4, min=1)
    """Seeds per prompt of the closing check."""
    pipeline_dir: str = ""
    """Where the pipeline folder goes; default OUTPUT_DIR/pipeline."""


CONFIG_CLASS = PretrainConfig  # read by the recipe tests


def main(args: Sequence[str] | None = None) -> Path:
    """Run the stage; returns the saved pipeline folder."""
    # ---- 1. Config, accelerator, trackers ---------------------------------------------
    config = parse_config(PretrainConfig, args)
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    start_tracking(accelerator, config, "pretrain")
    timings: dict[str, float] = {}
    started = time.time()

    # ---- 2. Components and the ground-truth pool ---------------------------------------
    components = build_components(config.model_size, output_dir / "tokenizer", seed=config.seed)
    pool = build_pool(config.pool_size, config.p_single, seed=config.seed)
    timings["pool_s"] = time.time() - started

    # ---- 3. VAE (a finished VAE in output_dir/vae is reused: phase-level resume) ----------
    latents = _vae_phase(config, accelerator, components, pool)
    timings["vae_s"] = time.time() - started - timings["pool_s"]

    # ---- 4. UNet + text encoder -------------------------------------------------------
    run = UNetRun(
        config.unet_steps,
        config.unet_batch_size,
        config.unet_lr,
        config.unet_warmup_steps,
        config.cfg_dropout,
        config.snr_gamma,
        config.ema_decay,
    )
    train_unet(
        accelerator,
        components,
        latents,
        pool,
        run,
        seed=config.seed,
        log_offset=config.vae_steps + 1,
    )
    timings["unet_s"] = time.time() - started - timings["pool_s"] - timings["vae_s"]

    # ---- 5. Save the pipeline ------------------------------------------------------------
    pipeline_dir = Path(config.pipeline_dir or output_dir / "pipeline")
    pipe = assemble_pipeline(components)
    if accelerator.is_main_process:
        pipe.save_pretrained(pipeline_dir, safe_serialization=True)
        _write_card(pipeline_dir, config, timings)
    accelerator.wait_for_everyone()
    logger.info(
        "saved the pipeline to %s after %.1f min", pipeline_dir, (time.time() - started) / 60
    )

    # ---- 6. Closing check with the shapes judge ----------------------------------------
    if config.eval_prompts and accelerator.is_main_process:
        _closing_check(config, accelerator, pipe)
    accelerator.end_training()
    return pipeline_dir


def _vae_phase(
    config: PretrainConfig, accelerator: Accelerator, components: dict, pool: Pool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train (or reuse) the VAE, encode the pool once, fit the latent scale; returns the latents."""
    vae_dir = Path(config.output_dir) / "vae"
    if (vae_dir / "config.json").is_file():
        logger.info("reusing the trained VAE in %s", vae_dir)
        components["vae"] = AutoencoderKL.from_pretrained(vae_dir)
    else:
        train_vae(
            accelerator,
            components["vae"],
            pool,
            config.vae_steps,
            config.vae_batch_size,
            config.vae_lr,
            config.vae_kl_weight,
        )
        if accelerator.is_main_process:
            components["vae"].save_pretrained(vae_dir)
    latents = encode_pool(components["vae"], pool)
    scale = fit_scaling_factor(components["vae"], *latents)
    # The judge reads decoded images, so this caps what the whole model can reach.
    recon = reconstruction_accuracy(components["vae"], pool)
    accelerator.log({"vae/judge_accuracy": recon}, step=config.vae_steps)
    logger.info("VAE: judge accepts %.3f of reconstructions; latent scale %.4f", recon, scale)
    return latents


def _closing_check(
    config: PretrainConfig, accelerator: Accelerator, pipe: StableDiffusionPipeline
) -> None:
    """Judge a few held-out and seen prompts with the fresh pipeline; log and print the summary."""
    seeds = list(range(config.eval_seeds))
    for split in ("heldout", "seen"):
        records = prompt_records(split, limit=config.eval_prompts, seed=config.seed)
        rows = generate_and_judge(pipe.to(accelerator.device), records, seeds)
        summary = summarise(rows, len(seeds))
        step = config.vae_steps + 1 + config.unet_steps
        accelerator.log({f"eval/{split}/{k}": v for k, v in summary.items()}, step=step)
        logger.info("eval %s: %s", split, {k: round(v, 3) for k, v in summary.items()})


def _write_card(folder: Path, config: PretrainConfig, timings: dict[str, float]) -> None:
    """A model card saying how the folder was made (paste bench/toy_baseline.py's table below
    it)."""
    fields = "\n".join(
        f"| {k} | {v} |" for k, v in config.to_dict().items() if k not in ("env", "pipeline_dir")
    )
    times = ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in timings.items())
    text = (
        f"# noisealign toy pipeline ({config.model_size})\n\n"
        "A `StableDiffusionPipeline` trained by `noisealign.pretrain` on procedurally drawn shapes "
        "(see docs/toy_world.md). 32x32 RGB images, 4x16x16 latents, DDIM v-prediction, "
        "20 steps, guidance 5 recommended.\n\n"
        f"Training time on {torch.get_num_threads()} CPU threads: {times}.\n\n"
        f"| recipe field | value |\n|---|---|\n{fields}\n"
    )
    (folder / "README.md").write_text(text)


if __name__ == "__main__":
    run_stage(main)
