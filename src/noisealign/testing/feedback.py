"""Synthetic collected-feedback datasets for distill tests: the collect schema, a known rule.

Rows look exactly like the collect stage's (same features, tokens of the given pipeline), but
the judge is replaced by a rule on the keyed noise: a word token "holds" when the noise's
channel-0 mean over the image half assigned to that word is positive. The rule depends on the
seed, so a reward model can learn to rank seeds, and on the prompt, so it is prompt-aware.

Example:
    >>> build_feedback_dataset(pipe, "runs/fake/dataset", prompts, seeds=range(4))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets

from ..data.prompts import prompt_hash_id
from ..data.schema import collect_features
from ..noise import initial_noise
from ..pipelines import encode_prompts, latent_shape

# Prompts of the distill tests' synthetic datasets: toy-grammar ones plus two the rule-based
# splitter handles but the toy judge would reject, so nothing depends on the toy grammar.
FEEDBACK_PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle above a red square",
    "a yellow circle right of a blue circle",
    "a red star",
    "a blue cat",
)


def rule_scores(noise, offsets) -> list[float]:
    """1.0 for a word token whose half of channel 0 (alternating top/bottom) has a positive mean."""
    half = noise.shape[1] // 2
    scores = []
    for index, (start, end) in enumerate(offsets):
        region = noise[0, :half] if index % 2 else noise[0, half:]
        scores.append(float(region.mean() > 0) if end > start else 0.0)
    return scores


def build_feedback_rows(
    pipe, prompts: Sequence[str], seeds: Iterable[int], pipeline: str = "tiny"
) -> list[dict]:
    """Rows of the collect schema for ``prompts`` × ``seeds`` with :func:`rule_scores` as the
    judge."""
    shape = latent_shape(pipe)
    emb = encode_prompts(pipe, list(prompts))
    rows = []
    for i, prompt in enumerate(prompts):
        pid = prompt_hash_id(prompt)
        for seed in seeds:
            noise = initial_noise(pid, seed, shape)
            scores = rule_scores(noise, emb.offsets[i])
            mask = [end > start for start, end in emb.offsets[i]]
            scored = [s for s, m in zip(scores, mask) if m]
            rows.append(
                {
                    "prompt_id": pid,
                    "prompt": prompt,
                    "seed": int(seed),
                    "pipeline": pipeline,
                    "num_inference_steps": 2,
                    "guidance_scale": 3.0,
                    "height": shape[1] * 2,
                    "width": shape[2] * 2,
                    "latent_shape": list(shape),
                    "judge": "rule",
                    "overall": sum(scored) / max(1, len(scored)),
                    "tokens": emb.tokens[i],
                    "token_scores": scores,
                    "token_mask": mask,
                    "concepts": [],
                    "failed": False,
                    "error": "",
                    "noise": noise.numpy(),
                }
            )
    return rows


def build_feedback_dataset(
    pipe,
    folder: str | Path,
    prompts: Sequence[str],
    seeds: Iterable[int],
    *,
    save_noise: bool = False,
    pipeline: str = "tiny",
) -> datasets.Dataset:
    """Save :func:`build_feedback_rows` to ``folder`` (``load_from_disk``-able) and return the
    dataset."""
    rows = build_feedback_rows(pipe, prompts, list(seeds), pipeline)
    if not save_noise:
        for row in rows:
            row.pop("noise")
    features = collect_features(latent_shape(pipe), save_images=False, save_noise=save_noise)
    dataset = datasets.Dataset.from_list(rows, features=features)
    dataset.save_to_disk(str(folder))
    return dataset
