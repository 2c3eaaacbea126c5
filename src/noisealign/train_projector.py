"""train_projector stage: a noise projector f_θ(ε, e) trained with quasi-DPO against a distilled reward model.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.errors import ConfigError

logger = logging.getLogger("noisealign.train_projector")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "reward_gradient")


@dataclass
class TrainProjectorConfig(BaseConfig):
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
    """What ranks the K candidates: 'reward_model' (r_φ, DESIGN.md) or 'verdicts' (with
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
    learning_rate: float = arg(1e-4, min=0, min_exclusive=True)
    """AdamW learning rate (constant after warm-up)."""
    weight_decay: float = arg(0.0, min=0)
    """AdamW weight decay."""
    warmup_steps: int = arg(0, min=0)
    """Linear warm-up steps."""
    max_grad_norm: float = arg(1.0, min=0)
    """Gradient clipping norm; 0 turns clipping off."""
    logging_steps: int = arg(10, min=1)
    """Log train metrics every this many steps."""
    save_steps: int = arg(100, min=1)
    """Checkpoint (accelerate save_state) every this many steps."""
    save_total_limit: int = arg(2, min=0)
    """Checkpoints kept (0 keeps all)."""
    resume_from_checkpoint: str | None = None
    """'latest' or a checkpoint folder to resume from."""
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


CONFIG_CLASS = TrainProjectorConfig  # read by `noisealign.cli` and the recipe tests


@dataclass
class TrainProjectorResult:
    """What :func:`main` returns: per-logged-step metrics and the saved folder."""

    history: list[dict[str, float]]
    model_dir: str


def step_loss(config, model, reward_model, pipe, emb, noise, ids, seeds, source):
    """Loss and metrics of one step on this process's samples (formulas: losses.preference).

    π_ref's mean is the identity (ε itself); ``source`` is the
    :class:`~noisealign.policies.candidates.CandidateSource` of the K candidates.
    """
    from noisealign.losses.preference import (
        gaussianity_penalty,
        quasi_dpo_loss,
        reward_gradient_loss,
    )
    from noisealign.policies.candidates import draw_candidates
    from noisealign.policies.training import make_pairs, repeat, reward_logits

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
    from noisealign.policies.training import noise_metrics, reward_logits

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


def log_images(accelerator, config, projector, pipe, judge, step: int) -> None:
    """Standard-vs-projected grid of the fixed prompts and seeds: PNG in output_dir/images, and wandb."""
    from noisealign.policies.training import comparison_grid

    prompts = [p for p in config.image_prompts for _ in config.image_seeds]
    seeds = [s for _ in config.image_prompts for s in config.image_seeds]
    grid, scores = comparison_grid(
        pipe, projector, prompts, seeds, judge, config.num_inference_steps, config.guidance_scale
    )
    folder = Path(config.output_dir, "images")
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:06d}.png")
    accelerator.log(scores, step=step)
    if config.report_to == "wandb":
        import wandb

        tracker = accelerator.get_tracker("wandb", unwrap=True)
        tracker.log({"images/standard_vs_projected": wandb.Image(grid)}, step=step)


def main(args: Sequence[str] | None = None) -> TrainProjectorResult:
    """Run the train_projector stage; returns the logged history (folder saved on the main process)."""
    # ---- 1. recipe and the accelerator (before touching the output folder) ----------
    config = parse_config(TrainProjectorConfig, args)
    from tqdm.auto import tqdm

    from noisealign.judges import build_judge
    from noisealign.noise import batch_noise
    from noisealign.outputs import check_output_dir_against_inputs
    from noisealign.pipelines import latent_shape, load_pipeline, pipeline_signature
    from noisealign.policies import NoiseProjector, NoiseProjectorConfig, load_projector
    from noisealign.policies.candidates import candidate_source
    from noisealign.policies.training import read_prompts, step_keys
    from noisealign.rewards import load_reward_model
    from noisealign.rewards.features import encode_prompt_table
    from noisealign.checkpointing import (
        check_output_dir,
        gathered_copy,
        load_checkpoint,
        resolve_checkpoint,
        save_checkpoint,
    )
    from noisealign.tracking import make_accelerator, start_tracking

    accelerator = make_accelerator(config)

    # ---- 2. prompts, pipeline, reward model: every check before any output -------------
    prompt_ids, prompts = read_prompts(config.prompts, config.dataset)
    check_output_dir_against_inputs(
        config.output_dir,
        {
            "pipeline": config.pipeline,
            "reward_model": config.reward_model,
            "dataset": config.dataset,
            "init_from": config.init_from,
            "candidate_images": config.candidate_images,
        },
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
            "loss_type 'reward_gradient' needs a reward model with input_steps 0 (no UNet in the gradient path)"
        )
    # float32 whatever the pipeline dtype: the projector and reward model train in float32
    table = encode_prompt_table(pipe, prompts).to(accelerator.device, torch.float32)
    shape = latent_shape(pipe)
    judge = build_judge(config.judge, **config.judge_kwargs) if config.judge else None
    source = candidate_source(config.candidate_images, pipe, prompt_ids)

    # ---- 3. projector, optimizer; resume; trackers --------------------------
    if config.init_from:
        model = load_projector(config.init_from, pipe).train()
    else:
        fields = dict(
            latent_channels=shape[0],
            text_dim=signature["text_embed_dim"],
            pooled_dim=signature["pooled_dim"],
        )
        projector_config = NoiseProjectorConfig(
            **{**fields, **config.projector_kwargs},
            pipeline_signature=signature,
            pipeline=config.pipeline,
        )
        torch.manual_seed(config.seed)  # same initial weights on every process
        model = NoiseProjector(projector_config)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = max(config.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    saved_config = json.loads(json.dumps(asdict(accelerator.unwrap_model(model).config)))
    state = {"step": 0, "batches": 0}
    if resume is not None:
        state = load_checkpoint(accelerator, resume, saved_config)
    start_tracking(accelerator, config, "train_projector")
    logger.info(
        "%d prompts; projector with %d parameters; loss %s",
        len(prompts),
        sum(p.numel() for p in model.parameters()),
        config.loss_type,
    )

    # ---- 4. train: fresh noise every step, keyed by (seed, step, position) -------------
    history: list[dict[str, float]] = []
    bar = tqdm(
        total=config.max_steps, initial=state["step"], disable=not accelerator.is_main_process
    )
    while state["step"] < config.max_steps:
        keys = step_keys(
            len(prompts),
            state["step"],
            config.batch_size,
            config.seed,
            accelerator.process_index,
            accelerator.num_processes,
        )
        ids = [prompt_ids[i] for i in keys.prompt_index]
        emb = table.select(keys.prompt_index)
        noise = batch_noise(ids, keys.seeds, shape).to(accelerator.device)
        loss, projected, metrics = step_loss(
            config, model, reward_model, pipe, emb, noise, ids, keys.seeds, source
        )
        accelerator.backward(loss)
        clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        state["step"] += 1
        state["batches"] = state["step"]
        bar.update(1)
        if state["step"] % config.logging_steps == 0 or state["step"] == config.max_steps:
            mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            logged = {
                "step": state["step"],
                "loss": mean_loss,
                "grad_norm": float(grad_norm),
                **metrics,
            }
            logged |= monitor(reward_model, pipe, emb, noise, projected)
            history.append(logged)
            accelerator.log(logged, step=state["step"])
            bar.set_postfix(loss=f"{mean_loss:.4f}", gain=f"{logged['reward/gain']:.3f}")
        if config.image_steps and state["step"] % config.image_steps == 0:
            projector = gathered_copy(accelerator, model)  # every process: FSDP gathers shards
            if projector is not None:
                projector.to(accelerator.device)
                log_images(accelerator, config, projector, pipe, judge, state["step"])
            accelerator.wait_for_everyone()
        if state["step"] % config.save_steps == 0:
            save_checkpoint(
                accelerator, config.output_dir, state, saved_config, config.save_total_limit
            )
    bar.close()

    # ---- 5. the projector folder (config records its pipeline) -------------------------
    projector = gathered_copy(accelerator, model)
    if projector is not None:
        projector.save_pretrained(config.output_dir)
        Path(config.output_dir, "train_metrics.json").write_text(json.dumps(history, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainProjectorResult(history, str(Path(config.output_dir)))


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
