"""The model card (README.md) of a distilled reward model: data, judge, inputs, held-out metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CARD_TEMPLATE = """---
{{ card_data }}
---

{{ card_body }}
"""


def split_seed(config: Any) -> int:
    """The held-out split's seed: ``split_seed`` if set, else the run's ``seed``."""
    return config.seed if config.split_seed is None else config.split_seed


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


FEATURE_LINE = (
    "x = step_features(pipe, noise, emb, steps=model.config.input_steps, "
    "kind=model.config.input_kind,\n"
    "                  num_inference_steps=model.config.num_inference_steps,\n"
    "                  guidance_scale=model.config.guidance_scale)  # noisealign.rewards.features\n"
)


def _metrics_table(
    metrics: dict[str, float], baseline: dict[str, float], teacher: dict[str, float] | None
) -> str:
    """The held-out metrics as a markdown table: this model, the baseline (and the teacher)."""
    rows = [
        ("token AUC", "token_auc"),
        ("overall Spearman ρ", "spearman"),
        ("pairwise accuracy (seeds of one prompt)", "pairwise_accuracy"),
    ]
    columns = [metrics, baseline] + ([] if teacher is None else [teacher])
    table = "\n".join(
        "| " + " | ".join([name, *(_fmt(c[key]) for c in columns)]) + " |" for name, key in rows
    )
    names = ["metric", "this model", "prompt-only baseline"] + (
        [] if teacher is None else ["teacher"]
    )
    header = "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|"
    return f"{header}\n{table}"


def _teacher_line(info: dict[str, Any]) -> str:
    if not info.get("teacher"):
        return ""
    return (
        f"- training targets: the teacher `{info['teacher']}`'s token and overall scores of "
        f"{info['train_rows']} fresh noises ({info['teacher_seeds']} seeds per training "
        "prompt), not the judge's rows; held-out metrics are against the judge\n"
    )


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
    info = {**info, "feature_line": "x = noise\n" if k == 0 else FEATURE_LINE}
    source = _teacher_line(info)
    table = _metrics_table(metrics, baseline, teacher)
    return f"""# noisealign reward model: {info["name"]}

A distilled reward model r_φ(ε, e) → (per-token logits, overall logit) that predicts the
judge's token-level and overall feedback from {inputs} and the prompt's token embeddings,
without generating an image. Trained with the `distill` stage of
[noisealign](https://github.com/noisealign/noisealign).

## Use

```python
from noisealign.rewards import load_reward_model
model = load_reward_model("{info["name"]}", expected_signature=pipeline_signature(pipe))
{info["feature_line"]}out = model(x, emb.embeds, emb.mask, emb.pooled)  \
# token_logits (B, L), overall_logit (B,)
```

## Training data

- dataset: `{info["dataset"]}` ({info["rows"]} usable rows, {info["prompts"]} prompts;
  {info["skipped_failed"]} failed judge rows and {info["skipped_nonfinite"]} rows with NaN/Inf \
skipped)
- judge: `{", ".join(info["judges"])}`
- pipeline: `{info["pipeline"]}` ({info["num_inference_steps"]} steps, \
CFG {info["guidance_scale"]})
- split by prompt: {info["train_prompts"]} training prompts, {info["eval_prompts"]} held-out prompts
{source}- architecture: `{info["architecture"]}`, {info["parameters"]:,} parameters, \
input steps k = {k}
- training: {info["max_steps"]} optimizer steps, {info["train_seconds"]:.0f} s

## Held-out metrics

On {int(metrics["rows"])} rows of the held-out prompts ({int(metrics["pairs"])} seed pairs the
judge scores differently). The prompt-only baseline predicts from the prompt embeddings alone
(ridge regression), so it gives every seed of a prompt the same score: its pairwise accuracy
is 0.5 by construction.

{table}

## Expected pipeline

```json
{json.dumps(info["pipeline_signature"], indent=2)}
```
"""


def card_info(config: Any, inputs: Any, model: Any, train_seconds: float, train_rows: int) -> dict:
    """The data and run facts (of :class:`~noisealign.distillation.stage.DistillInputs`) that
    the card and metrics.json record."""
    rows, train_ids, eval_ids = inputs.rows, inputs.train_ids, inputs.eval_ids
    return {
        "name": config.hub_model_id or config.output_dir,
        "dataset": config.dataset,
        "rows": len(rows),
        "prompts": len(set(rows.prompt_ids)),
        "skipped_failed": rows.skipped_failed,
        "skipped_nonfinite": len(rows.skipped_nonfinite),
        "judges": rows.judges,
        "pipeline": config.pipeline,
        "num_inference_steps": rows.num_inference_steps,
        "guidance_scale": rows.guidance_scale,
        "train_prompts": len(train_ids),
        "eval_prompts": len(eval_ids),
        "architecture": config.reward_model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_steps": config.input_steps,
        "input_kind": config.input_kind,
        "max_steps": config.max_steps,
        "train_seconds": train_seconds,
        "pipeline_signature": inputs.signature,
        "train_rows": train_rows,
        "teacher": config.teacher,
        "teacher_seeds": config.teacher_seeds if config.teacher else None,
        "eval_fraction": config.eval_fraction,
        "split_seed": split_seed(config),
        "eval_prompt_ids": sorted(eval_ids),
    }


def save_model(
    model: Any,
    config: Any,
    info: dict,
    metrics: dict[str, float],
    baseline: dict[str, float],
    teacher: dict[str, float] | None = None,
) -> None:
    """config.json + model.safetensors + README.md (and metrics.json) into ``output_dir``."""
    out = Path(config.output_dir)
    (out / "README.md").unlink(missing_ok=True)  # the mixin keeps an existing card
    body = card_body(info, metrics, baseline, teacher)
    model.save_pretrained(out, model_card_kwargs={"card_body": body})

    def clean(values: dict[str, float]) -> dict:
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()
        }

    payload = {"model": clean(metrics), "prompt_only_baseline": clean(baseline)}
    if teacher is not None:
        payload["teacher"] = clean(teacher)
    (out / "metrics.json").write_text(json.dumps({**payload, "info": info}, indent=2, default=str))
    if config.push_to_hub:
        model.push_to_hub(config.hub_model_id, model_card_kwargs={"card_body": body})
