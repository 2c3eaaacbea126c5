"""Generate toy images from the project's deterministic noise and score them with the judge.

Shared by the pretraining stage (a quick check logged at the end) and
``bench/toy_baseline.py`` (the committed baseline).

Example:
    >>> from noisealign.toy import pipeline_path
    >>> from diffusers import StableDiffusionPipeline
    >>> pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    >>> rows = generate_and_judge(pipe, prompt_records("heldout", limit=2), seeds=[0, 1])
    >>> sorted(rows[0])
    ['concepts', 'overall', 'prompt', 'prompt_id', 'seed']
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ..noise import batch_noise
from .grammar import prompt_records  # noqa: F401  (re-exported for the example)
from .judge import ShapesJudge
from .models import LATENT_SHAPE

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0


@torch.no_grad()
def generate_and_judge(
    pipe: StableDiffusionPipeline,
    records: Sequence[dict],
    seeds: Sequence[int],
    guidance_scale: float = DEFAULT_GUIDANCE,
    num_inference_steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
) -> list[dict]:
    """One row ``{prompt_id, prompt, seed, overall, concepts}`` per (record, seed).

    The initial latents are ``noisealign.noise.batch_noise(prompt_ids, seeds, (4, 16, 16))``,
    so every method compared on these rows starts from the same noise.
    """
    judge = ShapesJudge()
    keys = [(r, s) for r in records for s in seeds]
    rows = []
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        prompts = [r["prompt"] for r, _ in chunk]
        latents = batch_noise(
            [r["prompt_id"] for r, _ in chunk], [s for _, s in chunk], LATENT_SHAPE
        )
        images = pipe(
            prompts,
            latents=latents.to(pipe.device, pipe.unet.dtype),
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
        ).images
        for (record, seed), feedback in zip(chunk, judge.score(images, prompts)):
            rows.append(
                {
                    "prompt_id": record["prompt_id"],
                    "prompt": record["prompt"],
                    "seed": seed,
                    "overall": feedback.overall,
                    "concepts": [c.to_dict() for c in feedback.concepts],
                }
            )
    return rows


def summarise(rows: Sequence[dict], seeds_per_prompt: int) -> dict[str, float]:
    """Mean, best-of-4, best-of-8 (first k seeds) and worst-of-all over prompts; per-kind accuracy.

    Best-of-k is the mean over prompts of the maximum score among the prompt's first ``k``
    seeds, i.e. what a user who draws k noises and keeps the judge's favourite would get.
    """
    by_prompt: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt_id"]].append(row["overall"])
        for concept in row["concepts"]:
            kinds[concept["kind"]].append(concept["score"])
    scores = np.array([v[:seeds_per_prompt] for v in by_prompt.values()])
    summary = {"prompts": len(by_prompt), "images": int(scores.size), "mean": float(scores.mean())}
    for k in (4, 8):
        if seeds_per_prompt >= k:
            summary[f"best_of_{k}"] = float(scores[:, :k].max(1).mean())
    summary[f"worst_of_{seeds_per_prompt}"] = float(scores.min(1).mean())
    summary.update({f"acc_{kind}": float(np.mean(v)) for kind, v in sorted(kinds.items())})
    return summary
