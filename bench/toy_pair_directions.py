"""What one step's preference signal carries on the toy world: how consistent the directions are.

    .venv/bin/python bench/toy_pair_directions.py [--noises 32] [--rank_by reward_model|verdicts]

For every 8th seen prompt, ``--noises`` standard noises ε each get K = 8 candidates
√(1−γ)·ε + √γ·ξ_k (ξ: latents of the toy collect's images of the prompt, as the toy
train_projector recipe draws them), ranked by the recipe's k = 0 reward model (or by the
collected verdicts). Per sample, three directions the loss pushes ε′ along at Δ ≈ 0:

- ``best_worst``: x_best − x_worst (one pair per sample, the recipe's ``pair_mode``);
- ``all_pairs``: Σ over pairs with r_i > r_j of (x_i − x_j) = Σ_k (2·rank_k − K + 1)·x_k;
- ``nll``: x_best − ε, what ``rpo_alpha``'s regression onto the winner pulls along.

For each, the *consistency* is the mean cosine between the directions of two different noises of
the same prompt: the share of one sample's push that the next sample of the prompt repeats, which
is what training can accumulate. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import StableDiffusionPipeline

from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts
from noisealign.policies.candidates import ImageCandidates, draw_candidates
from noisealign.policies.training import repeat, reward_logits
from noisealign.rewards import load_reward_model
from noisealign.toy import pipeline_path
from noisealign.toy.grammar import prompt_records
from noisealign.toy.models import LATENT_SHAPE

K, GAMMA = 8, 0.1


def consistency(directions: torch.Tensor) -> float:
    """Mean off-diagonal cosine of ``directions`` (N, n); NaN rows (no pair) are dropped."""
    keep = directions.norm(dim=1) > 0
    unit = torch.nn.functional.normalize(directions[keep], dim=1)
    cos = unit @ unit.T
    m = len(unit)
    return float((cos.sum() - cos.diagonal().sum()) / max(m * (m - 1), 1))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noises", type=int, default=32)
    parser.add_argument("--rank_by", default="reward_model", choices=("reward_model", "verdicts"))
    parser.add_argument("--dataset", default="outputs/toy/collect/dataset")
    parser.add_argument("--reward_model", default="reward_models/toy-k0-student")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    source = ImageCandidates(args.dataset, pipe)
    reward = load_reward_model(args.reward_model).eval()
    ranks = torch.arange(K, dtype=torch.float32)
    found: dict[str, list[float]] = {"best_worst": [], "all_pairs": [], "nll": []}
    for record in prompt_records("seen")[::8]:
        ids, seeds = [record["prompt_id"]] * args.noises, list(range(10_000, 10_000 + args.noises))
        emb = encode_prompts(pipe, [record["prompt"]] * args.noises)
        eps = batch_noise(ids, seeds, LATENT_SHAPE)
        cands = draw_candidates(source, eps, ids, seeds, K, GAMMA)
        if args.rank_by == "verdicts":
            scores = source.verdicts(ids, seeds, K).view(-1, K)
        else:
            scores = reward_logits(reward, cands.flatten(0, 1), repeat(emb, K), pipe).view(-1, K)
        order = scores.argsort(1)
        weights = torch.empty_like(scores).scatter_(1, order, ranks.expand_as(scores))
        spread = scores.amax(1) > scores.amin(1)
        rows = torch.arange(args.noises)
        best = cands[rows, scores.argmax(1)].flatten(1)
        worst = cands[rows, scores.argmin(1)].flatten(1)
        directions = {
            "best_worst": best - worst,
            "all_pairs": ((2 * weights - K + 1)[..., None] * cands.flatten(2)).sum(1),
            "nll": best - eps.flatten(1),
        }
        for name, d in directions.items():
            found[name].append(consistency(d * spread[:, None]))
    out = {name: sum(v) / len(v) for name, v in found.items()}
    print(json.dumps({"rank_by": args.rank_by, "noises": args.noises, "consistency": out}))


if __name__ == "__main__":
    main()
