"""The model card (README.md) of a distilled reward model: data, judge, inputs, held-out metrics."""

from __future__ import annotations

import json
from typing import Any

CARD_TEMPLATE = """---
{{ card_data }}
---

{{ card_body }}
"""


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def card_body(
    info: dict[str, Any],
    metrics: dict[str, float],
    baseline: dict[str, float],
    teacher: dict[str, float] | None = None,
) -> str:
    """Markdown body; ``info`` holds the data and run facts, the metrics are held-out ones
    (``teacher``: those of the model whose labels it was trained on, if any)."""
    k = info["input_steps"]
    inputs = "the initial noise ε" if k == 0 else f"{info['input_kind']} after {k} DDIM steps"
    rows = [
        ("token AUC", "token_auc"),
        ("overall Spearman ρ", "spearman"),
        ("pairwise accuracy (seeds of one prompt)", "pairwise_accuracy"),
    ]
    info = {
        **info,
        "feature_line": "x = noise\n"
        if k == 0
        else (
            "x = step_features(pipe, noise, emb, steps=model.config.input_steps, kind=model.config.input_kind,\n"
            "                  num_inference_steps=model.config.num_inference_steps,\n"
            "                  guidance_scale=model.config.guidance_scale)  # noisealign.rewards.features\n"
        ),
    }
    columns = [metrics, baseline] + ([] if teacher is None else [teacher])
    table = "\n".join(
        "| " + " | ".join([name, *(_fmt(c[key]) for c in columns)]) + " |" for name, key in rows
    )
    names = ["metric", "this model", "prompt-only baseline"] + (
        [] if teacher is None else ["teacher"]
    )
    header = "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|"
    source = ""
    if info.get("teacher"):
        source = (
            f"- training targets: the teacher `{info['teacher']}`'s token and overall scores of "
            f"{info['train_rows']} fresh noises ({info['teacher_seeds']} seeds per training "
            "prompt), not the judge's rows; held-out metrics are against the judge\n"
        )
    return f"""# noisealign reward model: {info["name"]}

A distilled reward model r_φ(ε, e) → (per-token logits, overall logit) that predicts the
judge's token-level and overall feedback from {inputs} and the prompt's token embeddings,
without generating an image. Trained with the `distill` stage of
[noisealign](https://github.com/noisealign/noisealign).

## Use

```python
from noisealign.rewards import load_reward_model
model = load_reward_model("{info["name"]}", expected_signature=pipeline_signature(pipe))
{info["feature_line"]}out = model(x, emb.embeds, emb.mask, emb.pooled)  # token_logits (B, L), overall_logit (B,)
```

## Training data

- dataset: `{info["dataset"]}` ({info["rows"]} usable rows, {info["prompts"]} prompts;
  {info["skipped_failed"]} failed judge rows and {info["skipped_nonfinite"]} rows with NaN/Inf skipped)
- judge: `{", ".join(info["judges"])}`
- pipeline: `{info["pipeline"]}` ({info["num_inference_steps"]} steps, CFG {info["guidance_scale"]})
- split by prompt: {info["train_prompts"]} training prompts, {info["eval_prompts"]} held-out prompts
{source}- architecture: `{info["architecture"]}`, {info["parameters"]:,} parameters, input steps k = {k}
- training: {info["max_steps"]} optimizer steps, {info["train_seconds"]:.0f} s

## Held-out metrics

On {int(metrics["rows"])} rows of the held-out prompts ({int(metrics["pairs"])} seed pairs the
judge scores differently). The prompt-only baseline predicts from the prompt embeddings alone
(ridge regression), so it gives every seed of a prompt the same score: its pairwise accuracy
is 0.5 by construction.

{header}
{table}

## Expected pipeline

```json
{json.dumps(info["pipeline_signature"], indent=2)}
```
"""
