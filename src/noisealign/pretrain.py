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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, StableDiffusionPipeline

from noisealign.cli import run_stage
from noisealign.configs import BaseConfig, parse_config
from noisealign.toy.evaluate import generate_and_judge, summarise
from noisealign.toy.grammar import prompt_records
from noisealign.toy.models import PRESETS, assemble_pipeline, build_components
from noisealign.toy.train import (
    Pool,
    UNetRun,
    build_pool,
    encode_pool,
    fit_scaling_factor,
    reconstruction_accuracy,
    train_unet,
    train_vae,
)
from noisealign.tracking import make_accelerator, start_tracking

logger = logging.getLogger("noisealign.pretrain")


@dataclass
class PretrainConfig(BaseConfig):
    """Recipe of the toy model's pretraining (see recipes/toy/pretrain.yaml)."""

    model_size: str = field(
        default="toy",
        metadata={
            "help": "Architecture preset: 'toy' (the shipped model) or 'tiny' (tests).",
            "choices": tuple(PRESETS),
        },
    )
    pool_size: int = field(
        default=40000,
        metadata={
            "help": "Ground-truth scenes rendered (and encoded once) for training.",
            "min": 1,
        },
    )
    p_single: float = field(
        default=0.2,
        metadata={
            "help": "Share of one-object scenes in the pool; the rest are two-object training compositions.",
            "min": 0,
            "max": 1,
            "max_exclusive": True,
        },
    )
    vae_steps: int = field(default=1500, metadata={"help": "Optimiser steps of the VAE.", "min": 1})
    vae_batch_size: int = field(default=64, metadata={"help": "Images per VAE step.", "min": 1})
    vae_lr: float = field(
        default=1e-3,
        metadata={
            "help": "Peak AdamW learning rate of the VAE (warm-up, cosine decay).",
            "min": 0,
            "min_exclusive": True,
        },
    )
    vae_kl_weight: float = field(
        default=1e-6,
        metadata={"help": "Weight of the per-dimension KL term; tiny, as in SD's VAE.", "min": 0},
    )
    unet_steps: int = field(
        default=3200, metadata={"help": "Optimiser steps of the UNet and text encoder.", "min": 1}
    )
    unet_batch_size: int = field(default=64, metadata={"help": "Latents per UNet step.", "min": 1})
    unet_lr: float = field(
        default=1e-3,
        metadata={
            "help": "Peak AdamW learning rate of UNet and text encoder.",
            "min": 0,
            "min_exclusive": True,
        },
    )
    unet_warmup_steps: int = field(
        default=200, metadata={"help": "Linear warm-up steps before the cosine decay.", "min": 0}
    )
    cfg_dropout: float = field(
        default=0.1,
        metadata={
            "help": "Probability of training on the empty prompt (classifier-free guidance).",
            "min": 0,
            "max": 1,
            "max_exclusive": True,
        },
    )
    snr_gamma: float = field(
        default=5.0,
        metadata={"help": "Clip of the min-SNR loss weight.", "min": 0, "min_exclusive": True},
    )
    ema_decay: float = field(
        default=0.999,
        metadata={
            "help": "EMA decay of the saved UNet and text-encoder weights.",
            "min": 0,
            "max": 1,
            "max_exclusive": True,
        },
    )
    eval_prompts: int = field(
        default=16,
        metadata={
            "help": "Held-out and seen prompts (each) of the closing check; 0 skips it.",
            "min": 0,
        },
    )
    eval_seeds: int = field(
        default=4, metadata={"help": "Seeds per prompt of the closing check.", "min": 1}
    )
    pipeline_dir: str = field(
        default="",
        metadata={"help": "Where the pipeline folder goes; default OUTPUT_DIR/pipeline."},
    )


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
    """A model card saying how the folder was made (paste bench/toy_baseline.py's table below it)."""
    fields = "\n".join(
        f"| {k} | {v} |" for k, v in config.to_dict().items() if k not in ("env", "pipeline_dir")
    )
    times = ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in timings.items())
    text = (
        f"# noisealign toy pipeline ({config.model_size})\n\n"
        "A `StableDiffusionPipeline` trained by `noisealign.pretrain` on procedurally drawn shapes "
        "(see docs/toy_world.md). 32x32 RGB images, 4x16x16 latents, DDIM v-prediction, "
        f"20 steps, guidance 5 recommended.\n\nTraining time on {torch.get_num_threads()} CPU threads: {times}.\n\n"
        f"| recipe field | value |\n|---|---|\n{fields}\n"
    )
    (folder / "README.md").write_text(text)


if __name__ == "__main__":
    run_stage(main)
