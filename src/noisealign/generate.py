"""generate stage: images from a trained projector's noise, written as PNGs (optionally beside
the standard noise's).

Launch (any of):
    noisealign generate --projector outputs/toy/train_projector \\
        --prompt "a red circle left of a blue square" --seed 0 1 2
    python -m noisealign.generate --projector ... --prompt ... --seed 0 --side_by_side true \\
        --output_dir out/
    accelerate launch --num_processes 8 src/noisealign/generate.py --projector ... --prompt ... \\
        --seed 0 1 2 3
    noisealign generate --projector ... --prompt ... --seed 0 --scheduler dpmsolver++ \\
        --num_inference_steps 10

The pipeline defaults to the one recorded in the projector folder; a pipeline whose text
embeddings or latent shape differ from it fails with a one-line :class:`PipelineError`. Each
(prompt, seed) gives ``NNN_seedS.png`` (projected), plus ``NNN_seedS_standard.png`` or, with
``side_by_side``, one ``NNN_seedS_side_by_side.png`` (standard | projected), both from the
recipe's ``scheduler`` (DDIM unless set; :mod:`noisealign.pipelines.schedulers`). In Python:
``pipe(prompts, latents=noisealign.policies.apply_policy(pipe, projector, prompts, seeds))``.

The device is accelerate's (a GPU when there is one; ``accelerate launch --cpu`` or
``ACCELERATE_USE_CPU=1`` for the CPU). Launched with N processes, process r renders the
(prompt, seed) pairs r, r+N, ... under the same file names a single process gives them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from noisealign.cli import run_stage
from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.errors import ConfigError
from noisealign.outputs import check_output_dir_against_inputs
from noisealign.paths import resolve_recorded_path
from noisealign.pipelines import encode_prompts, generate, load_pipeline
from noisealign.pipelines.schedulers import SCHEDULERS, check_recipe_fields
from noisealign.policies import NoiseProjector, apply_policy, check_pipeline, load_projector
from noisealign.tracking import make_accelerator

logger = logging.getLogger("noisealign.generate")


@dataclass
class GenerateConfig(BaseConfig):
    """Recipe of the generate stage (every field also works as a CLI flag)."""

    output_dir: str = "generated"
    """Folder the PNGs are written to."""
    report_to: str = arg("none", choices=("wandb", "none"))
    """Unused here (no tracker); kept for the shared fields."""
    projector: str = arg("", required=True)
    """Projector folder written by train_projector (or a hub id). Required."""
    pipeline: str | None = None
    """Pipeline folder or hub id; default: the one recorded in the projector."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16."""
    prompt: list[str] = arg([], required=True)
    """Prompts (one or more). Required."""
    seed: list[int] = arg([0], required=True)
    """Seeds; every prompt is generated with every seed."""
    side_by_side: bool = False
    """Also render the standard noise, in one PNG beside the projected one."""
    num_inference_steps: int = arg(20, min=1)
    """Sampling steps."""
    guidance_scale: float = arg(5.0, min=0)
    """Classifier-free guidance scale."""
    scheduler: str = arg("ddim", choices=tuple(SCHEDULERS))
    """Sampler of the images: ddim (the default), euler, dpmsolver++, lcm, or flow_euler
    (for flow-matching models), built from the pipeline's scheduler config."""
    scheduler_kwargs: dict = arg({})
    """Extra arguments of the scheduler's class, e.g. {"use_karras_sigmas": true} (JSON on the
    command line); keys the class does not take are refused."""
    height: int | None = arg(None, min=8, multiple_of=8)
    """Image height in pixels (default: the pipeline's)."""
    width: int | None = arg(None, min=8, multiple_of=8)
    """Image width in pixels (default: the pipeline's)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # types and the limits in each field's metadata
        check_recipe_fields(self.scheduler, self.scheduler_kwargs)
        if any(not p.strip() for p in self.prompt):
            raise ConfigError(
                "recipe field 'prompt' holds an empty prompt; give each prompt some text"
            )


CONFIG_CLASS = GenerateConfig  # read by `noisealign.cli` and the recipe tests


def render(
    config: GenerateConfig, pipe, projector, keys: Sequence[tuple[int, str, int]]
) -> list[Path]:
    """Write the PNGs of ``keys`` = (index in prompt × seed order, prompt, seed); returns their
    paths."""
    index, prompts, seeds = (list(column) for column in zip(*keys))
    size = dict(height=config.height, width=config.width)
    projected, standard = apply_policy(
        pipe, projector, prompts, seeds, return_standard=True, **size
    )
    emb = encode_prompts(pipe, prompts)
    settings = dict(
        num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale
    )
    images = generate(pipe, emb, projected, **settings)
    plain = generate(pipe, emb, standard, **settings) if config.side_by_side else None
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (seed, image) in enumerate(zip(seeds, images)):
        stem = f"{index[i] // len(config.seed):03d}_seed{seed}"
        if plain is None:
            path = out / f"{stem}.png"
            image.save(path)
        else:
            pair = Image.new("RGB", (2 * image.width, image.height))
            pair.paste(plain[i], (0, 0))
            pair.paste(image, (image.width, 0))
            path = out / f"{stem}_side_by_side.png"
            pair.save(path)
        written.append(path)
    return written


def main(args: Sequence[str] | None = None) -> list[Path]:
    """Write the PNGs; returns the paths this process wrote (all of them with one process)."""
    config = parse_config(GenerateConfig, args)

    # ---- the output folder (checked against the inputs) and the processes
    check_output_dir_against_inputs(
        config.output_dir,
        {"projector": config.projector, "pipeline": config.pipeline},
        stage="generate",
        overwrite=config.overwrite_output_dir,
    )
    accelerator = make_accelerator(config)

    # ---- load the projector and its pipeline (checked against each other)
    projector = load_projector(config.projector)
    pipe = _load_pipeline(config, projector, accelerator.device)
    check_pipeline(projector, pipe, f"projector '{config.projector}'")
    projector = projector.to(accelerator.device)
    logger.info(
        "process %d on %s: pipeline on %s, projector on %s",
        accelerator.process_index,
        accelerator.device,
        pipe.device,
        next(projector.parameters()).device,
    )

    # ---- this process's share of every prompt with every seed, as PNGs
    pairs = [(p, s) for p in config.prompt for s in config.seed]
    rank, world = accelerator.process_index, accelerator.num_processes
    keys = [(i, *pairs[i]) for i in range(rank, len(pairs), world)]
    written = render(config, pipe, projector, keys) if keys else []
    logger.info(
        "process %d wrote %d of %d images to %s", rank, len(written), len(pairs), config.output_dir
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return written


def _load_pipeline(
    config: GenerateConfig, projector: NoiseProjector, device: torch.device
) -> DiffusionPipeline:
    """The recipe's pipeline, else the one the projector records, on ``device``."""
    # a relative recorded path resolves from the projector folder (noisealign.paths)
    recorded = projector.config.pipeline
    pipeline = config.pipeline or (recorded and resolve_recorded_path(recorded, config.projector))
    if not pipeline:
        raise ConfigError("the projector records no pipeline; pass --pipeline FOLDER")
    pipe = load_pipeline(
        pipeline,
        torch_dtype=config.torch_dtype,
        scheduler=config.scheduler,
        scheduler_kwargs=config.scheduler_kwargs,
        trust_remote_code=config.trust_remote_code,
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


if __name__ == "__main__":
    run_stage(main)
