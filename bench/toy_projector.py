"""Held-out alignment of a trained policy on the toy world: projected vs standard noise, same seeds.

    .venv/bin/python bench/toy_projector.py --projector outputs/toy/train_projector [--seeds 8]
    .venv/bin/python bench/toy_projector.py --policy outputs/toy/train_npnet      # any policy folder
    .venv/bin/python bench/toy_projector.py --projector src/noisealign/toy/assets/projector --residual_scale 2

``--policy`` and ``--projector`` are the same flag: any folder ``load_policy`` reads (noise
projector, NPNet, compatible NPNet).

For every held-out prompt (``prompt_records("heldout")``, compositions never seen in training)
and seed, the standard noise is ``batch_noise(prompt_id, seed)`` — the toy baseline's — and the
projected noise is f_θ of it; both are denoised with the same settings and scored by the
``shapes`` judge. Prints one JSON line: mean alignment of each, per-image win/tie/loss, the
mean per-prompt difference with a 95% bootstrap interval over prompts, and ε′'s Gaussianity
(per-sample mean, std, KS distance and the share passing ``GaussianStats.is_gaussian``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from noisealign.noise import batch_noise, gaussian_stats
from noisealign.pipelines import encode_prompts, generate
from noisealign.policies import POLICIES, load_policy, project
from noisealign.toy import pipeline_path
from noisealign.toy.grammar import prompt_records
from noisealign.toy.judge import ShapesJudge
from noisealign.toy.models import LATENT_SHAPE


def bootstrap(diff: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diff`` (one value per prompt), resampling prompts."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", "--projector", dest="projector", required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument(
        "--residual_scale", type=float, help="override a projector's residual_scale"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    projector = load_policy(args.projector, pipe)
    if args.residual_scale is not None:
        if not hasattr(projector.config, "residual_scale"):
            parser.error(f"--residual_scale needs a noise projector; {args.projector} is not one")
        projector.config.residual_scale = args.residual_scale
    policy_type = next(name for name, cls in POLICIES.items() if type(projector) is cls)
    judge = ShapesJudge()
    records = prompt_records(args.split)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    std_scores, proj_scores, stats, base = [], [], [], []
    for record in records:
        prompts = [record["prompt"]] * len(seeds)
        emb = encode_prompts(pipe, prompts)
        noise = batch_noise([record["prompt_id"]] * len(seeds), seeds, LATENT_SHAPE)
        projected = project(projector, noise, emb)
        stats.append(gaussian_stats(projected))
        base.append(gaussian_stats(noise))
        for x, out in ((noise, std_scores), (projected, proj_scores)):
            images = generate(pipe, emb, x, num_inference_steps=args.steps, guidance_scale=args.guidance)  # fmt: skip
            out.append([f.overall for f in judge.score(images, prompts)])
    std, proj = np.array(std_scores), np.array(proj_scores)
    per_prompt = proj.mean(1) - std.mean(1)
    low, high = bootstrap(per_prompt)
    mean_, std_, ks = (torch.cat([getattr(s, k) for s in stats]) for k in ("mean", "std", "ks"))
    passed = torch.cat([s.is_gaussian() for s in stats]).float().mean().item()
    result = {
        "projector": args.projector, "policy_type": policy_type, "residual_scale": args.residual_scale, "split": args.split, "prompts": len(records),
        "seeds": args.seeds, "standard_mean": float(std.mean()), "projected_mean": float(proj.mean()),
        "difference": float(per_prompt.mean()), "bootstrap95": [low, high],
        "wins": int((proj > std).sum()), "ties": int((proj == std).sum()), "losses": int((proj < std).sum()),
        "win_rate_decided": float((proj > std).sum() / max(1, (proj != std).sum())),
        "prompts_better": int((per_prompt > 0).sum()), "prompts_worse": int((per_prompt < 0).sum()),
        "eps_prime_mean_abs_max": float(mean_.abs().max()), "eps_prime_std_range": [float(std_.min()), float(std_.max())],
        "eps_prime_ks_mean": float(ks.mean()), "eps_prime_ks_max": float(ks.max()), "gaussian_share": passed,
        "standard_gaussian_share": torch.cat([s.is_gaussian() for s in base]).float().mean().item(),
        "standard_ks_mean": float(torch.cat([s.ks for s in base]).mean()),
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
