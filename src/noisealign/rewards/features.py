"""Inputs of a reward model computed with the frozen pipeline: the prompt table and k-step features.

k = 0 scores the pure noise. k = 1–3 runs the first k steps of the collect recipe's schedule
(DDIM, or flow-matching Euler for SD3 / FLUX: the trajectory the judged image took) and feeds
either x_{T−k} or the clean latent predicted at the last step; each step is one CFG model call,
so users trade k model calls per candidate for accuracy.

Example:
    >>> x = step_features(pipe, noise, emb, steps=2, kind="x0",
    ...                   num_inference_steps=20, guidance_scale=5.0)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..data.feedback import FeedbackRows
from ..errors import PipelineError
from ..noise import batch_noise
from ..pipelines import PromptEmbeddings, encode_prompts
from ..pipelines.sampling import pipeline_latents
from ..pipelines.schedulers import stepping_sampler
from ..pipelines.steps import schedule, x0_between


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
    """x_{T−k} (``kind="latent"``) or the predicted x0 (``"x0"``) after ``steps`` steps of
    ``pipe()`` on the family's own sampler (DDIM, or flow-matching Euler for SD3 / FLUX), whatever
    sampler the pipeline holds; the noise itself for k = 0.

    ``pipe()``'s callback reads the latents and stops the call after step k. The x0 is solved from
    the last step's input and output (:func:`noisealign.pipelines.steps.x0_between`), so it costs
    no extra model call, whatever the prediction type.
    """
    if steps == 0:
        return noise
    if steps > num_inference_steps:
        raise PipelineError(
            f"input_steps {steps} exceeds the schedule's {num_inference_steps} steps; lower "
            "input_steps"
        )
    with stepping_sampler(pipe):
        seen = pipeline_latents(
            pipe,
            embeds,
            noise,
            steps_run=steps,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
    x = seen[-1]
    if kind == "x0":
        x_prev = noise.to(x.device, x.dtype) if steps == 1 else seen[-2]
        sched = schedule(pipe, num_inference_steps, noise.shape[2:])
        x = x0_between(sched, steps - 1, x_prev, x)
    return x.to(noise.device, noise.dtype)


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
