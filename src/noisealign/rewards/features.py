"""Inputs of a reward model computed with the frozen pipeline: the prompt table and k-step features.

k = 0 scores the pure noise. k = 1–3 runs the first k DDIM steps of the collect recipe's
schedule (the trajectory the judged image actually took) and feeds either x_{T−k} or the
clean latent predicted at the last step; each step is one CFG UNet call, so users trade
k UNet calls per candidate for accuracy.

Example:
    >>> x = step_features(pipe, noise, emb, steps=2, kind="x0",
    ...                   num_inference_steps=20, guidance_scale=5.0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from ..data.feedback import FeedbackRows
from ..errors import PipelineError
from ..noise import batch_noise
from ..pipelines import PromptEmbeddings, denoise_step, encode_prompts


def encode_prompt_table(
    pipe: DiffusionPipeline, prompts: Sequence[str], batch_size: int = 64
) -> PromptEmbeddings:
    """Embeddings of each prompt once (the text encoder is frozen), in ``prompts`` order, on CPU."""
    parts = [
        encode_prompts(pipe, list(prompts[i : i + batch_size])).to("cpu", torch.float32)
        for i in range(0, len(prompts), batch_size)
    ]
    pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
    return PromptEmbeddings(
        embeds=torch.cat([p.embeds for p in parts]),
        pooled=pooled,
        mask=torch.cat([p.mask for p in parts]),
        tokens=[t for p in parts for t in p.tokens],
        offsets=[o for p in parts for o in p.offsets],
        truncated=[t for p in parts for t in p.truncated],
    )


def _same_pipeline(a: str, b: str) -> bool:
    """Same hub id, or two spellings of the same local folder."""
    if a == b:
        return True
    return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()


def check_rows_fit_pipeline(
    rows: FeedbackRows,
    table: PromptEmbeddings,
    prompt_order: Sequence[str],
    latent_channels: int,
    pipeline: str,
) -> None:
    """:class:`PipelineError` when the rows were collected with a pipeline other than ``pipeline``.

    The rows' token lists and latent channels must be the ones this pipeline produces.
    """
    where = f"the dataset was collected with {', '.join(rows.pipelines)}"
    fix = f"set 'pipeline' to the one it was collected with (recipe has '{pipeline}')"
    if any(not _same_pipeline(name, pipeline) for name in rows.pipelines):
        raise PipelineError(f"{where}, a different pipeline than the recipe's; {fix}")
    length = rows.token_targets.shape[1]
    if length != table.embeds.shape[1]:
        raise PipelineError(
            f"dataset rows have {length} tokens per prompt but the pipeline's text encoder gives "
            f"{tuple(table.embeds.shape[1:])} embeddings; {where}; {fix}"
        )
    if rows.latent_shape[0] != latent_channels:
        raise PipelineError(
            f"dataset latents have {rows.latent_shape[0]} channels but the pipeline's have "
            f"{latent_channels}; {where}; {fix}"
        )
    position = {pid: i for i, pid in enumerate(prompt_order)}
    for i, pid in enumerate(rows.prompt_ids):
        if rows.tokens[i] != table.tokens[position[pid]]:
            raise PipelineError(
                f"prompt '{rows.prompts[i][:40]}' was tokenized differently by the collect "
                "pipeline; "
                f"{where}; {fix}"
            )


def _x0_from_ddim_step(
    pipe: DiffusionPipeline, x_t: torch.Tensor, x_prev: torch.Tensor, steps: int, n: int
) -> torch.Tensor:
    """The clean latent the last DDIM step predicted, solved from its input and output.

    DDIM (eta = 0) writes x_t = a_t·x0 + b_t·ε and x_prev = a_p·x0 + b_p·ε with a = √ᾱ,
    b = √(1 − ᾱ), so x0 = (b_t·x_prev − b_p·x_t) / (b_t·a_p − b_p·a_t): no extra UNet call,
    whatever the prediction type.
    """
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(n)
    t = int(scheduler.timesteps[steps - 1])
    prev = t - scheduler.config.num_train_timesteps // n  # as DDIMScheduler.step computes it
    alpha_t = scheduler.alphas_cumprod[t].double()
    alpha_p = (
        scheduler.alphas_cumprod[prev].double()
        if prev >= 0
        else scheduler.final_alpha_cumprod.double()
    )
    a_t, b_t, a_p, b_p = alpha_t.sqrt(), (1 - alpha_t).sqrt(), alpha_p.sqrt(), (1 - alpha_p).sqrt()
    x0 = (b_t * x_prev.double() - b_p * x_t.double()) / (b_t * a_p - b_p * a_t)
    return x0.to(x_t.dtype)


def step_features(
    pipe: DiffusionPipeline,
    noise: torch.Tensor,
    embeds: PromptEmbeddings,
    *,
    steps: int,
    kind: str,
    num_inference_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """x_{T−k} (``kind="latent"``) or the predicted x0 (``"x0"``) after ``steps`` DDIM steps;
    the noise itself for k = 0."""
    if steps == 0:
        return noise
    if steps > num_inference_steps:
        raise PipelineError(
            f"input_steps {steps} exceeds the schedule's {num_inference_steps} steps; lower "
            "input_steps"
        )
    x_prev, x = noise, noise
    for index in range(steps):
        x_prev = x
        x = denoise_step(
            pipe,
            x,
            embeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            step_index=index,
        )
    if kind == "latent":
        return x
    return _x0_from_ddim_step(pipe, x_prev, x, steps, num_inference_steps)


def score_noise(
    model: torch.nn.Module, x: torch.Tensor, embeds: PromptEmbeddings, pipe: Any | None = None
) -> Any:
    """A reward model's output for noises ``x``: its own k DDIM steps first (k > 0 needs ``pipe``),
    then the forward in the model's dtype; ``.token_logits`` (B, L), ``.overall_logit`` (B,)."""
    cfg = model.config
    if cfg.input_steps > 0:
        x = step_features(
            pipe,
            x,
            embeds,
            steps=cfg.input_steps,
            kind=cfg.input_kind,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
        )
    dtype = next(model.parameters()).dtype
    embeds = embeds.to(dtype=dtype)
    return model(x.to(dtype), embeds.embeds, embeds.mask, embeds.pooled)


def precompute_features(
    pipe: DiffusionPipeline,
    rows: FeedbackRows,
    table: PromptEmbeddings,
    prompt_order: Sequence[str],
    *,
    steps: int,
    kind: str,
    batch_size: int = 64,
) -> torch.Tensor | None:
    """(N, C, H, W) k-step features of every row (float32, CPU), or ``None`` for k = 0 (the
    noise is re-derived)."""
    if steps == 0:
        return None
    position = {pid: i for i, pid in enumerate(prompt_order)}
    out = []
    for start in range(0, len(rows), batch_size):
        idx = list(range(start, min(start + batch_size, len(rows))))
        ids, seeds = [rows.prompt_ids[i] for i in idx], [rows.seeds[i] for i in idx]
        noise = (
            rows.noise[idx]
            if rows.noise is not None
            else batch_noise(ids, seeds, rows.latent_shape)
        )
        emb = table.select([position[p] for p in ids])
        x = step_features(
            pipe,
            noise.to(pipe.device),
            emb,
            steps=steps,
            kind=kind,
            num_inference_steps=rows.num_inference_steps,
            guidance_scale=rows.guidance_scale,
        )
        out.append(x.float().cpu())
    return torch.cat(out)
