"""What a prompt-level pattern in the noise is worth on the toy world, and what a projector learns.

    .venv/bin/python bench/toy_mean_pattern.py renders --gammas 0.05,0.1,0.2,0.3
    .venv/bin/python bench/toy_mean_pattern.py collect --gammas 0.1,0.2
    .venv/bin/python bench/toy_mean_pattern.py policies standard outputs/toy/train_projector

A *mean pattern* is one fixed latent per prompt: the mean of several standardised VAE latents
of images of the prompt, standardised again. The pipeline starts from the distribution-
preserving mix ε′ = √(1−γ)·ε + √γ·z of the standard noise ε (``batch_noise``) and that
pattern z — the same z for every seed, so unlike ``bench/toy_layout_oracle.py`` (one random
ground-truth layout per seed) the pattern is something a projector that sees only the prompt
could output.

- ``renders``: z = mean of ``--renders`` ground-truth scenes (``noisealign.toy.render``) of each
  of the first 24 held-out prompts; seeds 0–7.
- ``collect``: z = mean of the latents of the collect's *accepted* images of the prompt, and
  the mean of *all* its images, for every 8th seen prompt (46 prompts, seeds 100–103, so no
  seed of the collect itself); ``--dataset`` is a collect dataset with images.
- ``policies``: each policy folder (or ``standard``) on the same seen prompts and seeds, and
  the cosine of its residual ε′ − ε (seed 100) with the accepted mean, the all-images mean
  and their difference — which of the two patterns the projector has learned.

Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from toy_layout_oracle import layouts  # beside this script: its folder is on sys.path

from noisealign.data.image_latents import ImageLatents
from noisealign.noise import batch_noise, distribution_preserving_mix
from noisealign.pipelines import encode_prompts, generate
from noisealign.policies import load_policy
from noisealign.toy import pipeline_path
from noisealign.toy.grammar import prompt_records
from noisealign.toy.judge import ShapesJudge
from noisealign.toy.models import LATENT_SHAPE

SEEN_SEEDS = range(100, 104)


def standardise(z: torch.Tensor) -> torch.Tensor:
    """Each sample of ``z`` (B, ...) to mean 0, std 1 over its values."""
    flat = z.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(z)


def render_means(pipe, prompts: list[str], renders: int) -> torch.Tensor:
    """(B, C, H, W): the standardised mean of ``renders`` standardised scene latents per prompt,
    the scenes ``bench/toy_layout_oracle.py`` draws for its seeds 100, 101, …"""
    return standardise(
        torch.stack([layouts(pipe, prompts, 100 + i, 0) for i in range(renders)]).mean(0)
    )


def collect_means(images: ImageLatents, ids: list[str]) -> dict[str, torch.Tensor]:
    """The standardised mean latent of the accepted images and of all images of each prompt
    (a prompt without an accepted image gets the mean of all of them)."""
    means: dict[str, list[torch.Tensor]] = {"accepted": [], "all": []}
    for pid in ids:
        rows = images.by_prompt[pid]
        accepted = [i for i in rows if images.scores[i] > 0.5] or rows
        for name, chosen in (("accepted", accepted), ("all", rows)):
            means[name].append(
                torch.stack([images.latent(i, LATENT_SHAPE) for i in chosen]).mean(0)
            )
    return {name: standardise(torch.stack(z)) for name, z in means.items()}


def alignment(pipe, judge, emb, prompts, ids, seeds, latents_for) -> float:
    """Mean strict verdict over ``seeds`` of the images from ``latents_for(ε)``."""
    scores = []
    for seed in seeds:
        eps = batch_noise(ids, [seed] * len(ids), LATENT_SHAPE)
        images = generate(pipe, emb, latents_for(eps), num_inference_steps=20, guidance_scale=5.0)
        scores += [f.overall for f in judge.score(images, prompts)]
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("renders", "collect", "policies"))
    parser.add_argument("policies", nargs="*", help="policy folders or 'standard' (policies mode)")
    parser.add_argument("--gammas", default="0.05,0.1,0.2")
    parser.add_argument("--renders", type=int, default=32)
    parser.add_argument("--dataset", default="outputs/toy/collect/dataset")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    judge = ShapesJudge()
    records = (
        prompt_records("heldout", limit=24)
        if args.mode == "renders"
        else prompt_records("seen")[::8]
    )
    prompts, ids = [r["prompt"] for r in records], [r["prompt_id"] for r in records]
    emb = encode_prompts(pipe, prompts)
    if args.mode == "renders":
        patterns, seeds = {"renders": render_means(pipe, prompts, args.renders)}, range(8)
    else:
        patterns, seeds = collect_means(ImageLatents(args.dataset, pipe), ids), SEEN_SEEDS
    if args.mode != "policies":
        for name, z in patterns.items():
            for gamma in (float(g) for g in args.gammas.split(",")):
                score = alignment(
                    pipe,
                    judge,
                    emb,
                    prompts,
                    ids,
                    seeds,
                    lambda e, z=z, g=gamma: distribution_preserving_mix(e, z, g),
                )
                print(
                    json.dumps(
                        {
                            "pattern": name,
                            "gamma": gamma,
                            "prompts": len(ids),
                            "seeds": len(seeds),
                            "alignment": score,
                        }
                    )
                )
        return
    for path in args.policies:
        row = {"policy": path, "prompts": len(ids), "seeds": len(seeds)}
        if path == "standard":
            row["alignment"] = alignment(pipe, judge, emb, prompts, ids, seeds, lambda e: e)
        else:
            policy = load_policy(path, pipe)
            with torch.no_grad():
                move = lambda e, f=policy: f(e, emb.embeds, emb.mask, emb.pooled)  # noqa: E731
                row["alignment"] = alignment(pipe, judge, emb, prompts, ids, seeds, move)
                eps = batch_noise(ids, [100] * len(ids), LATENT_SHAPE)
                d = (move(eps) - eps).flatten(1)
            accepted, every = patterns["accepted"].flatten(1), patterns["all"].flatten(1)
            cos = lambda a, d=d: torch.nn.functional.cosine_similarity(d, a, dim=1).mean().item()  # noqa: E731
            row |= {
                "residual_norm": d.norm(dim=1).mean().item(),
                "cos_accepted": cos(accepted),
                "cos_all": cos(every),
                "cos_accepted_minus_all": cos(accepted - every),
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
