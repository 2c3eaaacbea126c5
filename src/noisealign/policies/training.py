"""Pieces of the train_projector stage: prompts, per-step noise keys, pairs, statistics, image
grids.

Everything random in a step is derived from (recipe seed, step, position in the global batch),
never from a global RNG, so a resumed run and a run on any number of processes draw exactly
the same prompts, noises and candidates (:mod:`noisealign.policies.candidates`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image, ImageDraw

from ..data.prompts import check_not_heldout, load_training_prompts, prompt_hash_id
from ..errors import DataError
from ..noise import batch_noise, gaussian_stats
from ..pipelines import PromptEmbeddings, encode_prompts, generate, latent_shape
from ..rewards.features import score_noise
from . import project
from .projector import NoiseProjector

PAIR_MODES = ("best_worst", "all")


def read_prompts(prompts: str | None, dataset: str | None) -> tuple[list[str], list[str]]:
    """(prompt ids, prompts) to train on: a prompt file's training rows, or a collected dataset's
    prompts; held-out prompts never come back (:mod:`noisealign.data.prompts`)."""
    if prompts:
        records = load_training_prompts(prompts, column_field=None)  # the stage reads 'prompt'
        return [r.prompt_id for r in records], [r.prompt for r in records]
    path = Path(str(dataset))
    if not (path / "dataset_info.json").is_file():
        raise DataError(f"dataset '{path}' does not exist; run the collect stage or set 'prompts'")
    table = datasets.load_from_disk(str(path)).select_columns(["prompt_id", "prompt"])
    unique = dict(zip(table["prompt_id"], table["prompt"]))
    ids = sorted(unique)
    check_not_heldout(path, ids)
    return ids, [unique[i] for i in ids]


@dataclass(frozen=True)
class StepKeys:
    """This process's share of one step: prompt indices and noise seeds, batch_size of each."""

    prompt_index: list[int]
    seeds: list[int]


def step_keys(
    num_prompts: int, step: int, batch_size: int, seed: int, rank: int, world: int
) -> StepKeys:
    """The global batch of ``batch_size·world`` (prompt, seed) keys of ``step``, cut for ``rank``.

    Seeds are ``step·global + position``: fresh noise every step, the same whatever ``world``.
    """
    total = batch_size * world
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(num_prompts, (total,), generator=generator).tolist()
    seeds = [step * total + j for j in range(total)]
    part = slice(rank * batch_size, (rank + 1) * batch_size)
    return StepKeys(index[part], seeds[part])


def make_pairs(rewards: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample, winner, loser) indices from candidate rewards (B, K).

    ``best_worst``: one pair per sample, its best and worst candidate, kept if they differ;
    ``all``: every (i, j) of one sample with r_i > r_j.
    """
    if mode == "best_worst":
        best, worst = rewards.argmax(1), rewards.argmin(1)
        gap = rewards.gather(1, best[:, None]) - rewards.gather(1, worst[:, None])
        keep = (gap[:, 0] > 0.0).nonzero().flatten()
        return keep, best[keep], worst[keep]
    if mode == "all":
        better = (rewards[:, :, None] - rewards[:, None, :]) > 0.0
        sample, winner, loser = better.nonzero(as_tuple=True)
        return sample, winner, loser
    raise ValueError(f"pair mode must be one of {PAIR_MODES}, got {mode!r}")


def reward_logits(
    reward_model: Any,
    x: torch.Tensor,
    emb: PromptEmbeddings,
    pipe: Any | None = None,
) -> torch.Tensor:
    """r_φ's overall logit (B,) of noises ``x`` (B, C, H, W); runs the model's k DDIM steps first
    if k > 0."""
    return score_noise(reward_model, x, emb, pipe).overall_logit


def repeat(emb: PromptEmbeddings, k: int) -> PromptEmbeddings:
    """Each row of ``emb`` repeated ``k`` times in place (rows b·k … b·k + k − 1 are sample b)."""
    return emb.select([i for i in range(len(emb)) for _ in range(k)])


def noise_metrics(x: torch.Tensor, prefix: str = "noise") -> dict[str, float]:
    """Mean over the batch of ε′'s per-sample mean, std, KS distance, share passing the checks."""
    stats = gaussian_stats(x)
    return {
        f"{prefix}/mean": stats.mean.mean().item(),
        f"{prefix}/std": stats.std.mean().item(),
        f"{prefix}/ks": stats.ks.mean().item(),
        f"{prefix}/gaussian_share": stats.is_gaussian().float().mean().item(),
    }


@torch.no_grad()
def comparison_grid(
    pipe: Any,
    projector: NoiseProjector,
    prompts: Sequence[str],
    seeds: Sequence[int],
    judge: Any | None,
    num_inference_steps: int,
    guidance_scale: float,
    shape: Sequence[int] | None = None,
) -> tuple[Image.Image, dict[str, float]]:
    """Rows = (prompt, seed); columns = standard | projected noise, judge scores on each tile.

    ``shape``: the noise's ``(C, h, w)``, the pipeline's default latents when ``None``."""
    emb = encode_prompts(pipe, prompts)
    shape = latent_shape(pipe) if shape is None else shape
    noise = batch_noise([prompt_hash_id(p) for p in prompts], list(seeds), shape)
    projected = project(projector, noise, emb)
    settings = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    columns = [generate(pipe, emb, x, **settings) for x in (noise, projected)]
    scores = [
        [f.overall for f in judge.score(c, list(prompts))] if judge else None for c in columns
    ]
    size = columns[0][0].size
    grid = Image.new("RGB", (2 * size[0], len(prompts) * size[1]), "white")
    for col, images in enumerate(columns):
        for row, image in enumerate(images):
            grid.paste(image, (col * size[0], row * size[1]))
            if scores[col] is not None:
                xy = (col * size[0] + 1, row * size[1])
                ImageDraw.Draw(grid).text(xy, f"{scores[col][row]:.2f}", fill="black")
    metrics = {}
    if judge is not None:
        metrics = {
            "images/judge_standard": sum(scores[0]) / len(prompts),
            "images/judge_projected": sum(scores[1]) / len(prompts),
        }
    return grid, metrics
