"""train_projector stage: a noise projector f_θ(ε, e) trained with quasi-DPO against a distilled
reward model.

Launch (any of):
    accelerate launch src/noisealign/train_projector.py --config recipes/toy/train_projector.yaml
    python -m noisealign.train_projector --config recipes/tiny/train_projector.yaml
    noisealign train_projector --config recipes/tiny/train_projector.yaml --output_dir runs/p

Each step draws fresh noise ε for prompts of the prompt file (or the collected dataset), K
candidates around ε (π_ref's mean) with the distribution-preserving mix — white noise or the
latents of collected images mixed in (``candidate_images``) — ranks them by r_φ (or by the
collected verdicts, ``rank_by``), forms (winner, loser) pairs and minimises the quasi-DPO
loss (docs/method.md) — with ``rpo_alpha`` > 0 plus the winner's NLL (TRL's RPO term) — and a
Gaussianity penalty on ε′.
``loss_type: reward_gradient`` is the ablation that maximises r_φ(f_θ(ε, e)) directly. Saves
a projector folder (config.json + model.safetensors) that records its pipeline; resume with
``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from noisealign.checkpointing import check_output_dir, resolve_checkpoint
from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.errors import ConfigError
from noisealign.judges import build_judge
from noisealign.outputs import check_output_dir_against_inputs
from noisealign.pipelines import PromptEmbeddings, latent_shape, load_pipeline, pipeline_signature
from noisealign.policies import NoiseProjector, NoiseProjectorConfig, load_projector
from noisealign.policies.candidates import CandidateSource, candidate_source
from noisealign.policies.preference_training import ProjectorStep
from noisealign.policies.training import read_prompts
from noisealign.rewards import load_reward_model
from noisealign.rewards.features import encode_prompt_table
from noisealign.tracking import make_accelerator, start_tracking
from noisealign.training import (
    Checkpointing,
    TrainerSettings,
    TrainParts,
    every,
    save_final,
    start_state,
    train,
    trainer_default,
)

logger = logging.getLogger("noisealign.train_projector")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "reward_gradient")


@dataclass
class TrainProjectorConfig(TrainerSettings, BaseConfig):
    """Recipe of the train_projector stage."""

    pipeline: str = arg("", required=True)
    """Pipeline (folder or hub id) whose text encoder embeds the prompts and whose latents are
    projected. Required."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16."""
    reward_model: str = arg("", required=True)
    """Distilled reward model folder (distill stage output) that scores candidates. Required."""
    prompts: str | None = None
    """Prompt file (txt / jsonl / csv); else the prompts of 'dataset'."""
    dataset: str | None = None
    """A collect stage dataset folder whose prompts are used when 'prompts' is unset."""
    projector_kwargs: dict = arg({})
    """Size of the projector (NoiseProjectorConfig fields, e.g. hidden_dim, depth, patch_size)."""
    init_from: str | None = None
    """Start from this projector folder instead of the identity."""
    residual_scale: float = arg(1.0, min=0)
    """s written into the saved projector (NoiseProjectorConfig.residual_scale): at inference
    ε′ = moment_match(ε, s·r), which extrapolates the learned residual. Training runs at s = 1
    (the weights would absorb any other value); docs/projector.md measures s."""
    loss_type: str = arg("sigmoid", choices=LOSS_TYPES)
    """'sigmoid' (DPO), 'ipo', 'hinge' (TRL's names) or 'reward_gradient' (the ablation)."""
    beta: float = arg(0.1, min=0, min_exclusive=True)
    """β: strength of the implicit KL to π_ref; only β/σ² matters for sigmoid/hinge."""
    rpo_alpha: float = arg(0.0, min=0)
    """TRL's rpo_alpha: weight of the winner's per-value NLL under N(f_θ, σ²I) added to the
    preference loss (0: plain quasi-DPO); see losses.preference."""
    sigma: float = arg(0.3, min=0, min_exclusive=True)
    """σ of the surrogate policy N(f_θ, σ²I); √candidate_gamma is the natural choice."""
    num_candidates: int = arg(8, min=1)
    """K candidates drawn per (ε, e)."""
    candidate_gamma: float = arg(0.1, min=0, min_exclusive=True, max=1)
    """γ of the mix √(1−γ)·f_ref + √γ·ξ that draws candidates (their spread)."""
    candidate_images: str | None = None
    """Where the candidates' ξ comes from (noisealign.policies.candidates): unset, white N(0, I)
    noise; a collect dataset with images (save_images: true), the standardised VAE latent of one
    of its images of the same prompt, so candidates differ in layout. Prompt ids must match the
    dataset's."""
    rank_by: str = arg("reward_model", choices=("reward_model", "verdicts"))
    """What ranks the K candidates: 'reward_model' (r_φ) or 'verdicts' (with
    candidate_images: the judge's collected score of each candidate's source image, i.e. offline
    preference pairs from the collect rows; r_φ then only feeds the logged reward metrics)."""
    pair_mode: str = arg("best_worst", choices=("best_worst", "all"))
    """'best_worst' (one pair per sample) or 'all' (every ordered pair of distinct scores)."""
    gaussianity_weight: float = arg(1.0, min=0)
    """λ of the Gaussianity penalty on ε′ (moments and lag-1 correlation)."""
    batch_size: int = arg(16, min=1)
    """(ε, e) samples per process per step."""
    max_steps: int = arg(500, min=1)
    """Optimizer steps."""
    lr_scheduler_type: str = arg("constant", choices=("constant", "cosine"))
    """Learning rate after the linear warm-up: 'constant', or 'cosine' down to 0 at max_steps
    (transformers' get_cosine_schedule_with_warmup)."""
    save_steps: int = trainer_default("save_steps", 100)
    image_steps: int = arg(0, min=0)
    """Every this many steps, a standard-vs-projected image grid from the real pipeline (0: never).
    """
    image_prompts: list[str] = arg([])
    """Fixed prompts of the image grid."""
    image_seeds: list[int] = arg([0])
    """Seeds of the image grid (each prompt with each seed)."""
    judge: str | None = None
    """Judge that scores the grid's images (e.g. 'shapes'); None: no scores."""
    judge_kwargs: dict = arg({})
    """Arguments of the judge factory (JSON on the command line), e.g. {model:
    openai/clip-vit-large-patch14} for 'clip'."""
    num_inference_steps: int = arg(20, min=1)
    """Sampling steps of the image grid."""
    guidance_scale: float = arg(5.0, min=0)
    """CFG scale of the image grid."""
    height: int | None = arg(None, min=8, multiple_of=8)
    """Image height in pixels of the noise trained on (and of the image grid); the pipeline's
    default when unset. The candidate images are resized to it."""
    width: int | None = arg(None, min=8, multiple_of=8)
    """Image width in pixels, as ``height``."""

    def __post_init__(self) -> None:
        super().__post_init__()  # types and the limits in each field's metadata
        if not self.prompts and not self.dataset:
            raise ConfigError(
                "recipe needs 'prompts' (a prompt file) or 'dataset' (collected rows)"
            )
        if self.loss_type != "reward_gradient" and self.num_candidates < 2:
            raise ConfigError("recipe field 'num_candidates' must be >= 2 to form pairs")
        if self.rank_by == "verdicts" and not self.candidate_images:
            raise ConfigError(
                "recipe field 'rank_by: verdicts' needs 'candidate_images' "
                "(a collect dataset with images)"
            )
        if self.image_steps and not self.image_prompts:
            raise ConfigError("recipe field 'image_prompts' is required when image_steps > 0")
        if "residual_scale" in self.projector_kwargs:
            raise ConfigError(
                "recipe field 'projector_kwargs' must not set residual_scale: training runs at "
                "1; set the top-level 'residual_scale' for the saved projector"
            )


CONFIG_CLASS = TrainProjectorConfig  # read by `noisealign.cli` and the recipe tests


@dataclass
class TrainProjectorResult:
    """What :func:`main` returns: per-logged-step metrics and the saved folder."""

    history: list[dict[str, float]]
    model_dir: str


@dataclass
class ProjectorInputs:
    """The checked inputs of a run; ``table``: the prompts' float32 embeddings on the device."""

    prompt_ids: list[str]
    prompts: list[str]
    resume: Path | None
    pipe: Any
    signature: dict[str, Any]
    reward_model: Any
    table: PromptEmbeddings
    source: CandidateSource
    judge: Any


def load_inputs(config: TrainProjectorConfig, accelerator) -> ProjectorInputs:
    """Prompts, pipeline, reward model: every check passed before any output is written; claims
    the output folder."""
    prompt_ids, prompts = read_prompts(config.prompts, config.dataset)
    inputs = ("pipeline", "reward_model", "dataset", "init_from", "candidate_images")
    check_output_dir_against_inputs(
        config.output_dir,
        {name: getattr(config, name) for name in inputs},
        stage="train_projector",
        overwrite=config.overwrite_output_dir,
    )
    check_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    resume = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    signature = pipeline_signature(pipe)
    reward_model = load_reward_model(config.reward_model, expected_signature=signature)
    reward_model.requires_grad_(False).eval().to(accelerator.device)
    if config.loss_type == "reward_gradient" and reward_model.config.input_steps > 0:
        raise ConfigError(
            "loss_type 'reward_gradient' needs a reward model with input_steps 0 (no UNet in the "
            "gradient path)"
        )
    # float32 whatever the pipeline dtype: the projector and reward model train in float32
    table = encode_prompt_table(pipe, prompts).to(accelerator.device, torch.float32)
    judge = build_judge(config.judge, **config.judge_kwargs) if config.judge else None
    source = candidate_source(config.candidate_images, pipe, prompt_ids)
    return ProjectorInputs(
        prompt_ids, prompts, resume, pipe, signature, reward_model, table, source, judge
    )


def build_projector(config: TrainProjectorConfig, inputs: ProjectorInputs) -> NoiseProjector:
    """The projector to train: ``init_from``'s, or a fresh one (the identity map) sized by the
    recipe, with the same initial weights on every process."""
    if config.init_from:
        projector = load_projector(config.init_from, inputs.pipe).train()
        projector.config.residual_scale = 1.0  # train the residual itself
        return projector
    signature = inputs.signature
    fields = dict(
        latent_channels=latent_shape(inputs.pipe)[0],
        text_dim=signature["text_embed_dim"],
        pooled_dim=signature["pooled_dim"],
    )
    projector_config = NoiseProjectorConfig(
        **{**fields, **config.projector_kwargs},
        pipeline_signature=signature,
        pipeline=config.pipeline,
    )
    torch.manual_seed(config.seed)
    return NoiseProjector(projector_config)


def build_parts(config: TrainProjectorConfig, accelerator, inputs, model) -> TrainParts:
    """The prepared projector, AdamW with the recipe's schedule after warm-up, and its step."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    # accelerate steps a prepared scheduler once per process per optimizer step
    n = accelerator.num_processes
    if config.lr_scheduler_type == "cosine":
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, config.warmup_steps * n, config.max_steps * n
        )
    else:
        warmup = max(config.warmup_steps * n, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup)
        )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = ProjectorStep(
        accelerator,
        config,
        model,
        inputs.reward_model,
        inputs.pipe,
        inputs.table,
        inputs.prompt_ids,
        latent_shape(inputs.pipe, config.height, config.width),
        inputs.source,
        inputs.judge,
    )
    return TrainParts(
        model,
        optimizer,
        scheduler,
        step,
        step.batch_for,
        config.max_steps,
        step.log,
        # the norm is logged every step: 'inf' measures it without clipping
        config.max_grad_norm if config.max_grad_norm > 0 else float("inf"),
        hooks=[every(config.image_steps, step.images)],
        checkpoints=Checkpointing.of(accelerator, config, model),
        name="train_projector",
    )


def save_projector(config: TrainProjectorConfig, projector, history: list[dict]) -> None:
    """The projector folder (its config records the pipeline and the recipe's
    residual_scale) and train_metrics.json."""
    projector.config.residual_scale = config.residual_scale
    projector.save_pretrained(config.output_dir)
    Path(config.output_dir, "train_metrics.json").write_text(json.dumps(history, indent=2))


def main(args: Sequence[str] | None = None) -> TrainProjectorResult:
    """Run the train_projector stage; returns the logged history (folder saved on the main
    process)."""
    # ---- the recipe and the accelerator (before touching the output folder) -------------
    config = parse_config(TrainProjectorConfig, args)
    accelerator = make_accelerator(config)

    # ---- prompts, pipeline, reward model: every check before any output ----------------
    inputs = load_inputs(config, accelerator)

    # ---- projector, optimizer; resume; trackers -----------------------------------------
    model = build_projector(config, inputs)
    parts = build_parts(config, accelerator, inputs, model)
    state = start_state(accelerator, config, inputs.resume, parts.checkpoints)
    start_tracking(accelerator, config, "train_projector")
    logger.info(
        "%d prompts; projector with %d parameters; loss %s",
        len(inputs.prompts),
        sum(p.numel() for p in model.parameters()),
        config.loss_type,
    )

    # ---- train: fresh noise every step, keyed by (seed, step, position) ------------------
    history = train(accelerator, parts, state)

    # ---- the projector folder -------------------------------------------------------------
    save_final(accelerator, parts.model, lambda p: save_projector(config, p, history))
    accelerator.end_training()
    return TrainProjectorResult(history, str(Path(config.output_dir)))


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
