"""Held-out pairwise accuracy of toy reward models against the judge, with a bootstrap interval.

    .venv/bin/python bench/toy_reward_heldout.py reward_models/toy reward_models/toy-k3-x0 reward_models/toy-k0-student

Re-measures the figures of reward_models/README.md and docs/distill.md: for each model folder,
the distill stage's split of the toy collect (eval_fraction 0.15, seed 0: 57 held-out prompts),
the model's overall logit of each held-out row (after its own k DDIM steps), and the pairwise
accuracy against the judge over seed pairs of one prompt (433 pairs), with a 95% bootstrap
interval over the held-out prompts (1,000 resamples, seed 0). Needs the toy collect in
outputs/toy/collect (``noisealign collect --config recipes/toy/collect.yaml``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from noisealign.data.feedback import clean_feedback, load_feedback, split_by_prompt
from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts, load_pipeline, pipeline_signature
from noisealign.policies.training import reward_logits
from noisealign.rewards.loading import load_reward_model
from noisealign.rewards.metrics import pairwise_accuracy
from noisealign.toy import pipeline_path


def per_prompt(scores: np.ndarray, judge: np.ndarray, group: np.ndarray) -> np.ndarray:
    """(prompts, 2): correct (ties half) and judged pairs of each held-out prompt."""
    out = []
    for value in np.unique(group):
        idx = np.flatnonzero(group == value)
        acc, pairs = pairwise_accuracy(
            torch.from_numpy(scores[idx]), torch.from_numpy(judge[idx]), torch.zeros(len(idx))
        )
        out.append((acc * pairs if pairs else 0.0, pairs))
    return np.array(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="reward model folders")
    parser.add_argument("--dataset", default="outputs/toy/collect/dataset")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    pipe = load_pipeline(str(pipeline_path()))
    rows = clean_feedback(load_feedback(args.dataset))
    _, eval_ids = split_by_prompt(rows.prompt_ids, 0.15, 2, 0)
    held_out = set(eval_ids)
    idx = [i for i, p in enumerate(rows.prompt_ids) if p in held_out]
    ids, seeds = [rows.prompt_ids[i] for i in idx], [rows.seeds[i] for i in idx]
    emb = encode_prompts(pipe, [rows.prompts[i] for i in idx])
    noise = (
        rows.noise[idx] if rows.noise is not None else batch_noise(ids, seeds, rows.latent_shape)
    )
    judge = rows.overall[idx].numpy()
    group = np.array([eval_ids.index(p) for p in ids])
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(eval_ids), size=(args.resamples, len(eval_ids)))
    for folder in args.models:
        model = load_reward_model(folder, expected_signature=pipeline_signature(pipe)).eval()
        with torch.no_grad():
            scores = torch.cat(
                [
                    reward_logits(
                        model, noise[s : s + 64], emb.select(range(s, min(s + 64, len(idx)))), pipe
                    )
                    for s in range(0, len(idx), 64)
                ]
            ).numpy()
        table = per_prompt(scores, judge, group)
        correct, pairs = table.sum(0)
        boot = table[draws].sum(1)
        low, high = np.percentile(boot[:, 0] / boot[:, 1], [2.5, 97.5])
        print(json.dumps({
            "model": folder, "k": model.config.input_steps, "pairwise_accuracy": round(correct / pairs, 4),
            "ci95": [round(low, 3), round(high, 3)], "pairs": int(pairs), "held_out_prompts": len(eval_ids),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
