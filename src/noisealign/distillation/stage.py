"""Pieces of the distill stage's ``main``: model fields, loaders and optimizer, baseline, saving.

Kept out of :mod:`noisealign.distill` so its ``main`` reads as the stage's steps.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.feedback import FeedbackDataset, FeedbackRows, PromptBatchSampler
from ..pipelines import PromptEmbeddings
from .baseline import PromptOnlyBaseline
from .card import card_body
from .metrics import reward_metrics
from .trainer import LossSettings, PromptTable, Schedule

logger = logging.getLogger(__name__)


def rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items()}


def split_seed(config: Any) -> int:
    """The held-out split's seed: ``split_seed`` if set, else the run's ``seed``."""
    return config.seed if config.split_seed is None else config.split_seed


def model_fields(config: Any, rows: FeedbackRows, signature: dict[str, Any]) -> dict[str, Any]:
    """Config fields of the reward model: shapes from the pipeline, k-step inputs from the recipe."""
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


def indices(rows: FeedbackRows, prompt_ids: list[str]) -> list[int]:
    """Positions of the rows of ``prompt_ids``."""
    keep = set(prompt_ids)
    return [i for i, pid in enumerate(rows.prompt_ids) if pid in keep]


def build_parts(
    config: Any,
    train_rows: FeedbackRows,
    eval_rows: FeedbackRows,
    prompt_order: list[str],
    features: tuple[torch.Tensor | None, torch.Tensor | None],
    model: torch.nn.Module,
    num_processes: int,
) -> dict[str, Any]:
    """Unprepared model, loaders (grouped by prompt), sampler, AdamW and a warm-up + cosine schedule.

    ``features``: the (train, eval) k-step inputs, or ``None`` where the noise is the input.
    """
    from transformers import get_cosine_schedule_with_warmup

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
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer, config.warmup_steps * num_processes, config.max_steps * num_processes
    )
    return {
        "model": model,
        "optimizer": optimizer,
        "lr_scheduler": lr_scheduler,
        "train_loader": DataLoader(train_set, batch_sampler=sampler),
        "eval_loader": DataLoader(eval_set, batch_sampler=eval_sampler),
        "sampler": sampler,
    }


def device_table(table: PromptEmbeddings, device: torch.device) -> PromptTable:
    pooled = None if table.pooled is None else table.pooled.to(device)
    return PromptTable(table.embeds.to(device), table.mask.to(device), pooled)


def loss_settings(config: Any) -> LossSettings:
    return LossSettings(
        config.token_weight,
        config.overall_weight,
        config.rank_weight,
        config.overall_loss,
        config.rank_margin,
    )


def schedule(config: Any) -> Schedule:
    return Schedule(
        config.max_steps,
        config.logging_steps,
        config.eval_steps,
        config.save_steps,
        config.save_total_limit,
        config.max_grad_norm,
    )


def baseline_metrics(
    rows: FeedbackRows,
    table: PromptEmbeddings,
    prompt_order: list[str],
    train_ids: list[str],
    eval_ids: list[str],
) -> dict[str, float]:
    """Held-out metrics of :class:`PromptOnlyBaseline`, fitted on per-prompt mean targets."""
    position = {pid: i for i, pid in enumerate(prompt_order)}
    group = torch.tensor([position[pid] for pid in rows.prompt_ids])
    train_p = torch.tensor([position[pid] for pid in train_ids])
    counts = torch.zeros(len(prompt_order)).index_add_(0, group, torch.ones(len(group)))
    mean_overall = torch.zeros(len(prompt_order)).index_add_(0, group, rows.overall) / counts.clamp(
        min=1
    )
    mask = rows.token_mask.float()
    scored = torch.zeros(len(prompt_order), mask.shape[1]).index_add_(0, group, mask)
    summed = torch.zeros_like(scored).index_add_(0, group, rows.token_targets * mask)
    mean_tokens = summed / scored.clamp(min=1)
    baseline = PromptOnlyBaseline.fit(
        table.embeds[train_p],
        table.mask[train_p],
        mean_tokens[train_p],
        scored[train_p] > 0,
        mean_overall[train_p],
    )
    eval_rows = torch.tensor(indices(rows, eval_ids))
    tokens, overall = baseline.predict(table.embeds[group[eval_rows]], table.mask[group[eval_rows]])
    return reward_metrics(
        tokens,
        overall,
        rows.token_targets[eval_rows],
        rows.token_mask[eval_rows],
        rows.overall[eval_rows],
        group[eval_rows],
    )


def teacher_training_rows(
    accelerator: Any,
    config: Any,
    teacher: torch.nn.Module,
    pipe: Any,
    table: PromptEmbeddings,
    prompt_order: list[str],
    rows: FeedbackRows,
    train_ids: list[str],
    eval_rows: FeedbackRows,
) -> tuple[FeedbackRows, dict[str, float]]:
    """The teacher's labels of fresh noises as training rows, and its own held-out metrics."""
    from .features import precompute_features
    from .teacher import label_plan, teacher_labels, teacher_rows
    from .trainer import evaluate

    ids, seeds = label_plan(train_ids, config.teacher_seeds, config.teacher_seed_start)
    labels = teacher_labels(
        accelerator,
        teacher,
        config.teacher,
        pipe,
        table,
        prompt_order,
        ids,
        seeds,
        rows.latent_shape,
        config.output_dir,
        batch_size=config.feature_batch_size,
        overwrite=config.overwrite_output_dir,
    )
    cfg = teacher.config
    inputs = precompute_features(
        pipe,
        eval_rows,
        table,
        prompt_order,
        steps=cfg.input_steps,
        kind=cfg.input_kind,
        batch_size=config.feature_batch_size,
    )
    held_out = FeedbackDataset(eval_rows, range(len(eval_rows)), prompt_order, inputs)
    loader = DataLoader(
        held_out, batch_sampler=PromptBatchSampler(held_out.prompt, config.prompts_per_batch, False)
    )
    metrics = evaluate(accelerator, teacher, loader, device_table(table, accelerator.device))
    logger.info(
        "%d noises (%d seeds x %d training prompts) labelled by the teacher; its held-out metrics: %s",
        len(ids),
        config.teacher_seeds,
        len(train_ids),
        rounded(metrics),
    )
    return teacher_rows(rows, ids, seeds, labels, config.teacher), metrics


def card_info(
    config, rows, signature, train_ids, eval_ids, model, train_seconds, train_rows
) -> dict:
    return {
        "name": config.hub_model_id or config.output_dir,
        "dataset": config.dataset,
        "rows": len(rows),
        "prompts": len(set(rows.prompt_ids)),
        "skipped_failed": rows.skipped_failed,
        "skipped_nonfinite": len(rows.skipped_nonfinite),
        "judges": rows.judges,
        "pipeline": config.pipeline,
        "num_inference_steps": rows.num_inference_steps,
        "guidance_scale": rows.guidance_scale,
        "train_prompts": len(train_ids),
        "eval_prompts": len(eval_ids),
        "architecture": config.reward_model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_steps": config.input_steps,
        "input_kind": config.input_kind,
        "max_steps": config.max_steps,
        "train_seconds": train_seconds,
        "pipeline_signature": signature,
        "train_rows": train_rows,
        "teacher": config.teacher,
        "teacher_seeds": config.teacher_seeds if config.teacher else None,
        "eval_fraction": config.eval_fraction,
        "split_seed": split_seed(config),
        "eval_prompt_ids": sorted(eval_ids),
    }


def save_model(
    model: Any,
    config: Any,
    info: dict,
    metrics: dict[str, float],
    baseline: dict[str, float],
    teacher: dict[str, float] | None = None,
) -> None:
    """config.json + model.safetensors + README.md (and metrics.json) into ``output_dir``."""
    out = Path(config.output_dir)
    (out / "README.md").unlink(missing_ok=True)  # the mixin keeps an existing card
    body = card_body(info, metrics, baseline, teacher)
    model.save_pretrained(out, model_card_kwargs={"card_body": body})

    def clean(values: dict[str, float]) -> dict:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()
        }

    payload = {"model": clean(metrics), "prompt_only_baseline": clean(baseline)}
    if teacher is not None:
        payload["teacher"] = clean(teacher)
    (out / "metrics.json").write_text(json.dumps({**payload, "info": info}, indent=2, default=str))
    if config.push_to_hub:
        model.push_to_hub(config.hub_model_id, model_card_kwargs={"card_body": body})
