"""Steps of the distill stage's ``main``: its inputs checked and loaded, the model, the training
rows and their k-step features, the training parts, and the prompt-only baseline.

Kept out of :mod:`noisealign.distill` so its ``main`` reads as the stage's steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from ..checkpointing import check_output_dir, resolve_checkpoint
from ..data.feedback import (
    FeedbackDataset,
    FeedbackRows,
    PromptBatchSampler,
    clean_feedback,
    load_feedback,
    split_by_prompt,
)
from ..data.prompts import check_not_heldout
from ..outputs import check_output_dir_against_inputs
from ..pipelines import PromptEmbeddings, latent_shape, load_pipeline, pipeline_signature
from ..rewards import build_reward_model, load_reward_model
from ..rewards.baseline import PromptOnlyBaseline
from ..rewards.features import check_rows_fit_pipeline, encode_prompt_table, precompute_features
from ..rewards.metrics import reward_metrics
from ..rewards.unet_backbone import check_backbone
from ..training import Checkpointing, EpochData, TrainParts, every
from .card import split_seed
from .teacher import check_teacher_split, teacher_training_rows
from .trainer import DistillStep, LossSettings, PromptTable

logger = logging.getLogger(__name__)


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items()}


@dataclass
class DistillInputs:
    """The checked inputs of a distill run: the judged rows and their prompt split, the pipeline
    and its prompt table (one row per prompt of ``prompt_order``), the teacher (or None) and the
    checkpoint to resume from."""

    rows: FeedbackRows
    train_ids: list[str]
    eval_ids: list[str]
    resume: Path | None
    pipe: Any
    prompt_order: list[str]
    table: PromptEmbeddings
    signature: dict[str, Any]
    teacher: Any


def load_inputs(config: Any, accelerator: Accelerator) -> DistillInputs:
    """Rows, split, pipeline and teacher, every check passed before any output is written; claims
    the output folder."""
    check_output_dir_against_inputs(
        config.output_dir,
        {"dataset": config.dataset, "pipeline": config.pipeline, "teacher": config.teacher},
        stage="distill",
        overwrite=config.overwrite_output_dir,
    )
    rows = clean_feedback(load_feedback(config.dataset))
    check_not_heldout(config.dataset, rows.prompt_ids)  # the evaluation prompts stay unseen
    # the validation split below is drawn from the collected (training) prompts only
    train_ids, eval_ids = split_by_prompt(
        rows.prompt_ids, config.eval_fraction, config.min_eval_prompts, split_seed(config)
    )
    check_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    resume = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(accelerator.device)
    prompt_order = sorted(set(rows.prompt_ids))
    first_prompt = {pid: p for pid, p in zip(rows.prompt_ids, rows.prompts)}
    table = encode_prompt_table(
        pipe, [first_prompt[pid] for pid in prompt_order], config.feature_batch_size
    )
    check_rows_fit_pipeline(rows, table, prompt_order, latent_shape(pipe)[0], config.pipeline)
    signature = pipeline_signature(pipe)
    check_backbone(config.reward_model, signature)
    teacher = None
    if config.teacher:
        teacher = load_reward_model(config.teacher, expected_signature=signature)
        check_teacher_split(config.teacher, eval_ids)
        teacher.to(accelerator.device)
    return DistillInputs(
        rows, train_ids, eval_ids, resume, pipe, prompt_order, table, signature, teacher
    )


def model_fields(config: Any, rows: FeedbackRows, signature: dict[str, Any]) -> dict[str, Any]:
    """Config fields of the reward model: shapes from the pipeline, k-step inputs from the
    recipe."""
    fields = {
        "latent_channels": signature["latent_channels"],
        "text_dim": signature["text_embed_dim"],
        "pooled_dim": signature["pooled_dim"],
        "input_steps": config.input_steps,
        "input_kind": config.input_kind,
        "num_inference_steps": rows.num_inference_steps,
        "guidance_scale": rows.guidance_scale,
        "pipeline_signature": signature,
        **config.model_kwargs,
    }
    if config.reward_model == "unet_lora":  # the backbone's weights come from the pipeline
        fields["pipeline"] = config.pipeline
        fields["vae_scale_factor"] = signature["vae_scale_factor"]
        fields.setdefault("backbone_dtype", config.torch_dtype)  # model_kwargs may override
    return fields


def build_model(config: Any, inputs: DistillInputs) -> torch.nn.Module:
    """A fresh reward model, with the same initial weights on every process."""
    set_seed(config.seed)
    fields = model_fields(config, inputs.rows, inputs.signature)
    model = build_reward_model(config.reward_model, **fields)
    rows = inputs.rows
    logger.info(
        "%d usable rows (%d failed, %d NaN/Inf skipped); %d train / %d held-out prompts; "
        "%s with %d parameters",
        len(rows),
        rows.skipped_failed,
        len(rows.skipped_nonfinite),
        len(inputs.train_ids),
        len(inputs.eval_ids),
        config.reward_model,
        sum(p.numel() for p in model.parameters()),
    )
    return model


def indices(rows: FeedbackRows, prompt_ids: list[str]) -> list[int]:
    """Positions of the rows of ``prompt_ids``."""
    keep = set(prompt_ids)
    return [i for i, pid in enumerate(rows.prompt_ids) if pid in keep]


def training_rows(accelerator: Accelerator, config: Any, inputs: DistillInputs) -> tuple:
    """``(train_rows, eval_rows, teacher_metrics)``: the judge's rows of the training prompts, or
    the teacher's labels of fresh noises (then the teacher is dropped), and the held-out rows."""
    eval_rows = inputs.rows.select(indices(inputs.rows, inputs.eval_ids))
    train_rows = inputs.rows.select(indices(inputs.rows, inputs.train_ids))
    if inputs.teacher is None:
        return train_rows, eval_rows, None
    train_rows, teacher_metrics = teacher_training_rows(accelerator, config, inputs, eval_rows)
    inputs.teacher = None
    return train_rows, eval_rows, teacher_metrics


def features(config: Any, inputs: DistillInputs, *parts: FeedbackRows) -> tuple:
    """The k-step inputs of each of ``parts`` with the frozen UNet (None each for k = 0)."""
    started = time.perf_counter()
    found = tuple(
        precompute_features(
            inputs.pipe,
            part,
            inputs.table,
            inputs.prompt_order,
            steps=config.input_steps,
            kind=config.input_kind,
            batch_size=config.feature_batch_size,
        )
        for part in parts
    )
    if found[0] is not None:
        logger.info(
            "k = %d features of %d rows in %.1f s",
            config.input_steps,
            sum(len(part) for part in parts),
            time.perf_counter() - started,
        )
    return found


def build_parts(
    config: Any,
    train_rows: FeedbackRows,
    eval_rows: FeedbackRows,
    prompt_order: list[str],
    features: tuple[torch.Tensor | None, torch.Tensor | None],
    model: torch.nn.Module,
    accelerator: Accelerator,
    table: PromptEmbeddings,
) -> tuple[TrainParts, DataLoader, PromptTable]:
    """The prepared training parts (loaders grouped by prompt, AdamW, a warm-up + cosine
    schedule), the unprepared held-out loader and the prompt table on the training device.

    ``features``: the (train, eval) k-step inputs, or ``None`` where the noise is the input.
    """
    train_set = FeedbackDataset(train_rows, range(len(train_rows)), prompt_order, features[0])
    eval_set = FeedbackDataset(eval_rows, range(len(eval_rows)), prompt_order, features[1])
    sampler = PromptBatchSampler(
        train_set.prompt,
        config.prompts_per_batch,
        shuffle=True,
        seed=config.seed,
        seeds_per_group=config.seeds_per_group,
    )
    eval_sampler = PromptBatchSampler(eval_set.prompt, config.prompts_per_batch, shuffle=False)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    # accelerate steps a prepared scheduler once per process per optimizer step
    n = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, config.warmup_steps * n, config.max_steps * n
    )
    loader = DataLoader(train_set, batch_sampler=sampler)
    # the eval loader stays unprepared: every process scores the whole (small) held-out set
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    on_device = PromptTable.on(table, accelerator.device)
    step = DistillStep(
        accelerator, model, scheduler, on_device, loss_settings(config), config.logging_steps
    )
    eval_loader = DataLoader(eval_set, batch_sampler=eval_sampler)
    evaluation = every(config.eval_steps, step.evaluation(eval_loader), before=config.max_steps)
    parts = TrainParts(
        model,
        optimizer,
        scheduler,
        step,
        EpochData(loader, sampler),
        config.max_steps,
        step.log,
        config.max_grad_norm,
        hooks=[evaluation],
        checkpoints=Checkpointing.of(accelerator, config, model),
        name="distill",
    )
    return parts, eval_loader, on_device


def loss_settings(config: Any) -> LossSettings:
    return LossSettings(
        config.token_weight,
        config.overall_weight,
        config.rank_weight,
        config.overall_loss,
        config.rank_margin,
    )


def baseline_metrics(inputs: DistillInputs) -> dict[str, float]:
    """Held-out metrics of :class:`PromptOnlyBaseline`, fitted on per-prompt mean targets."""
    rows, prompt_order = inputs.rows, inputs.prompt_order
    position = {pid: i for i, pid in enumerate(prompt_order)}
    group = torch.tensor([position[pid] for pid in rows.prompt_ids])
    train_p = torch.tensor([position[pid] for pid in inputs.train_ids])
    counts = torch.zeros(len(prompt_order)).index_add_(0, group, torch.ones(len(group)))
    overall_sum = torch.zeros(len(prompt_order)).index_add_(0, group, rows.overall)
    mean_overall = overall_sum / counts.clamp(min=1)
    mask = rows.token_mask.float()
    scored = torch.zeros(len(prompt_order), mask.shape[1]).index_add_(0, group, mask)
    summed = torch.zeros_like(scored).index_add_(0, group, rows.token_targets * mask)
    mean_tokens = summed / scored.clamp(min=1)
    embeds, token_mask = inputs.table.embeds, inputs.table.mask
    baseline = PromptOnlyBaseline.fit(
        embeds[train_p],
        token_mask[train_p],
        mean_tokens[train_p],
        scored[train_p] > 0,
        mean_overall[train_p],
    )
    eval_rows = torch.tensor(indices(rows, inputs.eval_ids))
    tokens, overall = baseline.predict(embeds[group[eval_rows]], token_mask[group[eval_rows]])
    return reward_metrics(
        tokens,
        overall,
        rows.token_targets[eval_rows],
        rows.token_mask[eval_rows],
        rows.overall[eval_rows],
        group[eval_rows],
    )
