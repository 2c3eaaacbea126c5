"""train_npnet stage: NPNet trained with MSE on the kept noise pairs of collect_npd (Golden Noise,
arXiv 2411.09502, Alg. 2).

Launch (any of):
    accelerate launch src/noisealign/train_npnet.py --config recipes/toy/train_npnet.yaml
    python -m noisealign.train_npnet --config recipes/tiny/train_npnet.yaml
    noisealign train_npnet --config recipes/tiny/train_npnet.yaml --output_dir runs/npnet

Each batch holds kept pairs (x_T, x′_T) of many prompts; every sample is conditioned on its
*own* prompt's token embeddings, encoded by the pipeline's frozen text encoder (the official
code gives the whole batch the first prompt's). Held-out prompts (no pair of theirs is trained
on) give an eval MSE next to the identity map's. Saves a policy folder that records its
pipeline; resume with ``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup

from noisealign.checkpointing import check_output_dir, resolve_checkpoint
from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.data.feedback import PromptBatchSampler, split_by_prompt
from noisealign.data.npd import (
    NoisePairDataset,
    NoisePairs,
    check_pairs_fit_pipeline,
    load_noise_pairs,
    pass_through,
)
from noisealign.data.prompts import check_not_heldout
from noisealign.outputs import check_output_dir_against_inputs
from noisealign.pipelines import load_pipeline, pipeline_signature
from noisealign.policies import load_policy
from noisealign.policies.pair_training import NPNetStep, build_policy, evaluate
from noisealign.tracking import make_accelerator, start_tracking
from noisealign.training import (
    Checkpointing,
    EpochData,
    TrainerSettings,
    TrainParts,
    every,
    save_final,
    start_state,
    train,
)

logger = logging.getLogger("noisealign.train_npnet")
POLICY_TYPES = ("npnet", "npnet_compat", "noise_projector")


@dataclass
class TrainNPNetConfig(TrainerSettings, BaseConfig):
    """Recipe of the train_npnet stage."""

    pipeline: str = arg("", required=True)
    """Pipeline (folder or hub id) the pairs were collected with; its text encoder embeds the
    prompts. Required."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16 (the policy trains in float32)."""
    dataset: str = arg("", required=True)
    """collect_npd output folder (or its dataset/). Required."""
    margin: float | None = None
    """Re-filter the pairs with this m (target score > source score + m); None uses the 'kept'
    column."""
    policy_type: str = arg("npnet", choices=POLICY_TYPES)
    """'npnet' (improved, any latent size, per-token prompt attention), 'npnet_compat' (official
    architecture, 4 x 128 x 128 only) or 'noise_projector' (the quasi-DPO projector regressed onto
    the pairs, e.g. as train_projector's init_from)."""
    policy_kwargs: dict = arg({})
    """Size of the policy (NPNetConfig / NPNetCompatConfig / NoiseProjectorConfig fields, e.g.
    hidden_dim, depth)."""
    init_from: str | None = None
    """Start from this policy folder (e.g. a converted official checkpoint) instead of fresh
    weights."""
    eval_fraction: float = arg(0.1, min=0, min_exclusive=True, max=1, max_exclusive=True)
    """Share of the prompts held out (all their pairs) for the eval MSE."""
    min_eval_prompts: int = arg(1, min=1)
    """At least this many held-out prompts."""
    batch_size: int = arg(64, min=1)
    """Pairs per process per forward (paper: 64)."""
    gradient_accumulation_steps: int = arg(1, min=1)
    """Forwards per optimizer step."""
    num_epochs: int = arg(30, min=1)
    """Passes over the training pairs (paper: 30); ignored when max_steps is set."""
    max_steps: int | None = arg(None, min=1)
    """Optimizer steps; overrides num_epochs."""
    eval_steps: int = arg(0, min=0)
    """Held-out evaluation every this many steps (0: only at the end)."""


CONFIG_CLASS = TrainNPNetConfig  # read by `noisealign.cli` and the recipe tests


@dataclass
class TrainNPNetResult:
    """What :func:`main` returns: per-step train metrics, the final held-out metrics, the saved
    folder."""

    history: list[dict[str, float]]
    metrics: dict[str, float]
    model_dir: str


@dataclass
class PairSplit:
    """Pair rows and prompt ids of the training and the held-out prompts."""

    train_ids: list[str]
    eval_ids: list[str]
    train_rows: list[int]
    eval_rows: list[int]


def split_pairs(pairs: NoisePairs, config: TrainNPNetConfig) -> PairSplit:
    """Hold out whole prompts (all their pairs) for the eval MSE."""
    train_ids, eval_ids = split_by_prompt(
        pairs.prompt_ids, config.eval_fraction, config.min_eval_prompts, config.seed
    )
    held_out = set(eval_ids)
    train_rows = [i for i, pid in enumerate(pairs.prompt_ids) if pid not in held_out]
    eval_rows = [i for i, pid in enumerate(pairs.prompt_ids) if pid in held_out]
    return PairSplit(train_ids, eval_ids, train_rows, eval_rows)


def build_parts(config, accelerator, pairs, split, model, pipe) -> tuple[TrainParts, DataLoader]:
    """The prepared training parts (row-level shuffling keyed by (seed, epoch), AdamW, a constant
    schedule with warm-up) and the unprepared held-out loader."""
    train_set = NoisePairDataset(pairs, split.train_rows)
    eval_set = NoisePairDataset(pairs, split.eval_rows)
    # each pair is its own group: batches of `batch_size` pairs, reshuffled per epoch
    sampler = PromptBatchSampler(
        range(len(train_set)), config.batch_size, shuffle=True, seed=config.seed
    )
    eval_sampler = PromptBatchSampler(range(len(eval_set)), config.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    # accelerate steps a prepared scheduler once per process per optimizer step
    warmup = config.warmup_steps * accelerator.num_processes
    scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=pass_through)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    max_steps = config.max_steps or config.num_epochs * steps_per_epoch
    step = NPNetStep(accelerator, model, scheduler, pipe, pairs, config.logging_steps)
    eval_loader = DataLoader(eval_set, batch_sampler=eval_sampler, collate_fn=pass_through)

    def evaluation(at: int) -> None:
        values = evaluate(accelerator, model, pipe, pairs, eval_loader)
        accelerator.log({f"eval/{k}": v for k, v in values.items()}, step=at)

    parts = TrainParts(
        model,
        optimizer,
        scheduler,
        step,
        EpochData(loader, sampler),
        max_steps,
        step.log,
        config.max_grad_norm,
        hooks=[every(config.eval_steps, evaluation, before=max_steps)],
        checkpoints=Checkpointing.of(accelerator, config, model),
        name="train_npnet",
    )
    return parts, eval_loader


def load_inputs(config: TrainNPNetConfig, accelerator) -> tuple[NoisePairs, PairSplit, Any, Any]:
    """The pairs, their prompt split, the checkpoint to resume from and the pipeline, every check
    passed before any output is written; claims the output folder."""
    check_output_dir_against_inputs(
        config.output_dir,
        {"dataset": config.dataset, "pipeline": config.pipeline, "init_from": config.init_from},
        stage="train_npnet",
        overwrite=config.overwrite_output_dir,
    )
    pairs = load_noise_pairs(config.dataset, config.margin)
    check_not_heldout(config.dataset, pairs.prompt_ids)  # the evaluation prompts stay unseen
    split = split_pairs(pairs, config)
    check_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    resume = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(accelerator.device)
    check_pairs_fit_pipeline(pairs, pipeline_signature(pipe), config.dataset)
    return pairs, split, resume, pipe


def log_sizes(config, pairs: NoisePairs, split: PairSplit, model, max_steps: int) -> None:
    logger.info(
        "%d kept pairs (%d not kept, %d NaN/Inf skipped): %d train pairs of %d prompts, "
        "%d held-out pairs of %d prompts; %s with %d parameters; %d steps",
        pairs.num_rows,
        pairs.skipped_not_kept,
        len(pairs.skipped_nonfinite),
        len(split.train_rows),
        len(split.train_ids),
        len(split.eval_rows),
        len(split.eval_ids),
        config.policy_type,
        sum(p.numel() for p in model.parameters()),
        max_steps,
    )


def save_policy(config, policy, history, metrics, split: PairSplit) -> None:
    """The policy folder (its config records the pipeline) and train_metrics.json."""
    policy.save_pretrained(config.output_dir)
    summary = {
        "history": history,
        "eval": metrics,
        "train_pairs": len(split.train_rows),
        "eval_pairs": len(split.eval_rows),
        "train_prompts": split.train_ids,
        "eval_prompts": split.eval_ids,
    }
    Path(config.output_dir, "train_metrics.json").write_text(json.dumps(summary, indent=2))


def main(args: Sequence[str] | None = None) -> TrainNPNetResult:
    """Run the train_npnet stage; returns the history and held-out metrics (folder saved on the
    main process)."""
    # ---- the recipe and the accelerator (before touching the output folder) -------------
    config = parse_config(TrainNPNetConfig, args)
    accelerator = make_accelerator(
        config, gradient_accumulation_steps=config.gradient_accumulation_steps
    )

    # ---- pairs, split, pipeline: every check before any output is written ---------------
    pairs, split, resume, pipe = load_inputs(config, accelerator)

    # ---- the policy, loaders, optimizer; resume; trackers --------------------------------
    if config.init_from:
        model = load_policy(config.init_from, pipe).train()
    else:
        model = build_policy(config, pipeline_signature(pipe), pairs.latent_shape)
    parts, eval_loader = build_parts(config, accelerator, pairs, split, model, pipe)
    state = start_state(accelerator, config, resume, parts.checkpoints)
    start_tracking(accelerator, config, "train_npnet")
    log_sizes(config, pairs, split, model, parts.max_steps)

    # ---- train ---------------------------------------------------------------------------
    history = train(accelerator, parts, state)

    # ---- held-out metrics; the policy folder ---------------------------------------------
    metrics = evaluate(accelerator, parts.model, pipe, pairs, eval_loader)
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state["step"])
    logger.info("held-out: %s", {k: round(v, 4) for k, v in metrics.items()})
    save_final(
        accelerator,
        parts.model,
        lambda policy: save_policy(config, policy, history, metrics, split),
    )
    accelerator.end_training()
    return TrainNPNetResult(history, metrics, str(Path(config.output_dir)))


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
