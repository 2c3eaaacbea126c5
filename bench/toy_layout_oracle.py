"""How much can the initial noise alone buy on the toy world? A layout oracle in the noise.

    .venv/bin/python bench/toy_layout_oracle.py                       # gammas 0,0.02,0.05,0.1,0.2
    .venv/bin/python bench/toy_layout_oracle.py --grid 4 --gammas 0.05,0.1,0.2

For each held-out prompt and seed, a ground-truth scene of the prompt is drawn (a fresh random
layout per seed, ``noisealign.toy.render``), encoded by the pipeline's VAE and standardised per
sample to z; optionally blurred to a ``grid``×``grid`` pattern (average-pooled, then upsampled).
The pipeline then starts from ε′ = √(1−γ)·ε + √γ·z, a distribution-preserving mix of the
standard noise ε (``batch_noise``) and the layout, and the ``shapes`` judge scores the image.

γ = 0 is the standard baseline. The rise with γ is the headroom of a prompt-aware noise policy
that keeps ε′ Gaussian per value: a policy that learned to put such a pattern into the noise
would reach it without any extra sampling. Prints one JSON line per γ.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from noisealign.noise import batch_noise, distribution_preserving_mix
from noisealign.pipelines import encode_prompts, generate
from noisealign.toy import pipeline_path
from noisealign.toy.grammar import prompt_records
from noisealign.toy.judge import ShapesJudge
from noisealign.toy.models import LATENT_SHAPE
from noisealign.toy.render import render_prompt


@torch.no_grad()
def layouts(pipe, prompts: list[str], seed: int, grid: int) -> torch.Tensor:
    """(B, C, H, W) standardised VAE latents of one random ground-truth scene per prompt."""
    rng = random.Random(1000 + seed)
    images = np.stack([np.asarray(render_prompt(p, rng)) for p in prompts])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    if grid:
        pooled = torch.nn.functional.adaptive_avg_pool2d(z, grid)
        z = torch.nn.functional.interpolate(pooled, size=z.shape[-2:], mode="bilinear", align_corners=False)  # fmt: skip
    flat = z.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(pipeline_path()))
    parser.add_argument("--gammas", default="0,0.02,0.05,0.1,0.2", help="comma-separated γ values")
    parser.add_argument("--grid", type=int, default=0, help="blur the layout to grid×grid (0: keep it sharp)")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    records = prompt_records("heldout", limit=args.prompts)
    prompts, ids = [r["prompt"] for r in records], [r["prompt_id"] for r in records]
    emb = encode_prompts(pipe, prompts)
    judge = ShapesJudge()
    for gamma in (float(g) for g in args.gammas.split(",")):
        started, scores = time.time(), []
        for seed in range(args.seeds):
            eps = batch_noise(ids, [seed] * len(ids), LATENT_SHAPE)
            latents = distribution_preserving_mix(
                eps, layouts(pipe, prompts, seed, args.grid), gamma
            )
            images = generate(pipe, emb, latents, num_inference_steps=args.steps, guidance_scale=args.guidance)  # fmt: skip
            scores += [f.overall for f in judge.score(images, prompts)]
        print(json.dumps({
            "gamma": gamma, "grid": args.grid, "prompts": len(prompts), "seeds": args.seeds,
            "alignment": float(np.mean(scores)), "seconds": round(time.time() - started, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
