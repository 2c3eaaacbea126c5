"""Train a noise projector by regression onto each prompt's accepted-images pattern (an experiment).

    .venv/bin/python bench/toy_pattern_projector.py --config recipes/toy/train_projector.yaml \
      --candidate_images outputs/toy/collect16/dataset --image_steps 0 --report_to none \
      --output_dir outputs/exp/pattern16 [--seed 1]
    .venv/bin/python bench/toy_projector.py --projector outputs/exp/pattern16 --seeds 8 --residual_scale 2
    .venv/bin/python bench/toy_projector.py \
      --projector src/noisealign/toy/assets/projector+outputs/exp/pattern16 --seeds 8 --residual_scale 1.25

The train_projector stage (same recipe, arguments, batches, checkpoints and saved folder) with
its quasi-DPO loss replaced by a supervised one: f_θ(ε, e) regresses onto
√(1−γ)·ε + √γ·z̄, where z̄ is the standardised mean of the standardised latents of the
``candidate_images`` collect's *accepted* images of the prompt (overall > 0.5) and γ the recipe's
``candidate_gamma``. It is the mean pattern of ``bench/toy_mean_pattern.py collect`` (worth 0.587
on seen prompts at γ 0.1) learned from the prompt, so that held-out compositions get one too.
Prompts with no accepted image are left out of the loss. The weight is that of the recipe's RPO
term, ``rpo_alpha`` / (2σ²), and the Gaussianity penalty is the recipe's. No reward model ranks
anything (the recipe's ``reward_model`` is still loaded: the stage logs r_φ(ε′)).

The library does not ship this loss: alone it scores as the recipe does on the held-out
compositions; summed with the recipe's projector (``--projector A+B`` above) it adds to it
(docs/projector.md, "The accepted-images pattern").
"""

from __future__ import annotations

import sys

import torch

from noisealign import train_projector
from noisealign.losses.preference import gaussianity_penalty
from noisealign.noise import distribution_preserving_mix
from noisealign.policies import preference_training

PATTERNS: dict[str, torch.Tensor | None] = {}


def pattern(images, prompt_id: str, shape) -> torch.Tensor | None:
    """z̄ of one prompt (cached), or None when the collect accepted none of its images."""
    if prompt_id not in PATTERNS:
        rows = images.by_prompt[prompt_id]
        accepted = [i for i in rows if images.scores[i] > 0.5]
        z = None
        if accepted:
            z = torch.stack([images.latent(i, shape) for i in accepted]).mean(0)
            z = (z - z.mean()) / z.std()
        PATTERNS[prompt_id] = z
    return PATTERNS[prompt_id]


def pattern_loss(config, model, reward_model, pipe, emb, noise, ids, seeds, source):
    """``preference_training.step_loss``'s signature: the regression loss, its metrics and ε′."""
    if not hasattr(source, "images"):
        raise SystemExit("this experiment needs candidate_images (a collect dataset with images)")
    projected = model(noise, emb.embeds, emb.mask, emb.pooled)
    found = [pattern(source.images, pid, noise.shape[1:]) for pid in ids]
    keep = torch.tensor([z is not None for z in found], device=noise.device)
    z = torch.stack([torch.zeros(noise.shape[1:]) if p is None else p for p in found])
    target = distribution_preserving_mix(noise, z.to(noise), config.candidate_gamma)
    error = (projected - target).pow(2).flatten(1).mean(1)
    loss = (error * keep).sum() / keep.sum().clamp_min(1) * config.rpo_alpha / (2 * config.sigma**2)
    penalty, gauss = gaussianity_penalty(projected)
    metrics = {"loss/pattern_mse": error[keep].mean().item() if keep.any() else 0.0}
    return loss + config.gaussianity_weight * penalty, projected.detach(), {**metrics, **gauss}


if __name__ == "__main__":
    preference_training.step_loss = pattern_loss  # ProjectorStep calls it by this name
    train_projector.main(sys.argv[1:])
