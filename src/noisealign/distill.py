"""Distill stage: collected token-level judge feedback → a reward model r_φ(ε, e) from the noise
alone.

Launch (any of):
    accelerate launch src/noisealign/distill.py --config recipes/toy/distill.yaml
    python -m noisealign.distill --config recipes/toy/distill.yaml
    noisealign distill --config recipes/tiny/distill.yaml --output_dir runs/distill

Reads the collect stage's dataset, splits it by prompt, trains with token BCE + overall BCE/MSE
+ a pairwise ranking term between seeds of one prompt, and saves a self-describing folder
(config.json + model.safetensors + README.md model card) into ``output_dir``. Resume with
``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.distillation import card, stage
from noisealign.distillation.trainer import evaluate, log_heldout
from noisealign.errors import ConfigError
from noisealign.tracking import make_accelerator, start_tracking
from noisealign.training import TrainerSettings, save_final, start_state, train, trainer_default

logger = logging.getLogger("noisealign.distill")


@dataclass
class DistillConfig(TrainerSettings, BaseConfig):
    """Recipe of the distill stage."""

    dataset: str = arg("", required=True)
    """The collect stage's dataset folder (<collect output_dir>/dataset). Required."""
    pipeline: str = arg("", required=True)
    """Pipeline the rows were collected with (folder or hub id); its frozen text encoder embeds the
    prompts. Required."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16."""
    reward_model: str = "transformer"
    """Architecture: 'transformer' or 'unet_lora'."""
    model_kwargs: dict = arg({})
    """Size of the reward model (its config fields, e.g. hidden_dim, depth)."""
    input_steps: int = arg(0, min=0, max=10)
    """k: DDIM steps of the collect schedule run before scoring (0 = pure noise; 1-3 trade k UNet
    calls for accuracy)."""
    input_kind: str = arg("latent", choices=("latent", "x0"))
    """For k > 0: 'latent' (x_{T-k}) or 'x0' (predicted clean latent)."""
    teacher: str | None = None
    """A distilled k-step reward model folder. When set, the student trains on its token and overall
    scores of teacher_seeds fresh noises per training prompt instead of the judge's rows (held-out
    evaluation stays against the judge)."""
    teacher_seeds: int = arg(150, min=1)
    """Fresh seeds the teacher labels per training prompt."""
    teacher_seed_start: int = arg(1_000_000, min=0)
    """First seed of the teacher's noises (keep it above the collect's seeds)."""
    seeds_per_group: int = arg(0, min=0)
    """Seeds of one prompt per batch group (0: all of them); with a teacher, e.g. 8 keeps batches at
    prompts_per_batch x 8 rows."""
    eval_fraction: float = arg(0.1, min=0, min_exclusive=True, max=1, max_exclusive=True)
    """Fraction of prompts held out for evaluation."""
    split_seed: int | None = None
    """Seed of the held-out prompt split (default: seed), so runs with other initialisation seeds
    can share one split."""
    min_eval_prompts: int = arg(2, min=1)
    """Fewest held-out prompts; fewer usable prompts is an error."""
    prompts_per_batch: int = arg(8, min=1)
    """Prompts per batch, each with all its seeds (pairs for the ranking term)."""
    gradient_accumulation_steps: int = arg(1, min=1)
    """Batches per optimizer step."""
    max_steps: int = arg(1000, min=1)
    """Optimizer steps."""
    learning_rate: float = trainer_default("learning_rate", 3e-4)
    """AdamW peak learning rate."""
    weight_decay: float = trainer_default("weight_decay", 0.01)
    warmup_steps: int = trainer_default("warmup_steps", 50)
    """Linear warm-up steps before the cosine decay."""
    token_weight: float = arg(1.0, min=0)
    """Weight of the token BCE."""
    overall_weight: float = arg(1.0, min=0)
    """Weight of the overall-score loss."""
    overall_loss: str = arg("bce", choices=("bce", "mse"))
    """'bce' on the logit or 'mse' on its sigmoid."""
    rank_weight: float = arg(1.0, min=0)
    """Weight of the pairwise ranking term."""
    rank_margin: float = arg(0.0, min=0)
    """Pairs count only if the judge scores differ by more."""
    eval_steps: int = arg(200, min=0)
    """Evaluate on held-out prompts every this many steps (0: only at the end)."""
    save_steps: int = trainer_default("save_steps", 200)
    feature_batch_size: int = arg(64, min=1)
    """Rows per batch when embedding prompts and running the k steps."""
    push_to_hub: bool = False
    """Push the saved folder to the hub as hub_model_id."""
    hub_model_id: str | None = None
    """Hub repo id for push_to_hub."""

    def __post_init__(self) -> None:
        super().__post_init__()  # types and the limits in each field's metadata
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("recipe field 'hub_model_id' is required when push_to_hub is true")


CONFIG_CLASS = DistillConfig  # read by `noisealign.cli` and the recipe tests


@dataclass
class DistillResult:
    """What :func:`main` returns: per-step train metrics, held-out metrics of model and baseline
    (and of the teacher, when one labelled the training rows)."""

    history: list[dict[str, float]]
    metrics: dict[str, float]
    baseline: dict[str, float]
    model_dir: str
    teacher: dict[str, float] | None = None


def main(args: Sequence[str] | None = None) -> DistillResult:
    """Run the distill stage; returns the history and metrics (saved model on the main process)."""
    # ---- the recipe and the accelerator (before touching the output folder) -------------
    config = parse_config(DistillConfig, args)
    accelerator = make_accelerator(
        config, gradient_accumulation_steps=config.gradient_accumulation_steps
    )

    # ---- rows, split, pipeline, teacher: every check before any output is written -------
    inputs = stage.load_inputs(config, accelerator)
    model = stage.build_model(config, inputs)

    # ---- training rows (the judge's, or the teacher's labels of fresh noises) -----------
    train_rows, eval_rows, teacher_metrics = stage.training_rows(accelerator, config, inputs)

    # ---- inputs: k-step features with the frozen UNet, prompt-only baseline -------------
    features = stage.features(config, inputs, train_rows, eval_rows)
    inputs.pipe = None  # the UNet variant copied what it needs
    baseline = stage.baseline_metrics(inputs)
    logger.info("prompt-only baseline on held-out prompts: %s", stage.rounded(baseline))

    # ---- loaders, optimizer, resume; trackers start once all checks passed ---------------
    parts, eval_loader, table = stage.build_parts(
        config,
        train_rows,
        eval_rows,
        inputs.prompt_order,
        features,
        model,
        accelerator,
        inputs.table,
    )
    state = start_state(accelerator, config, inputs.resume, parts.checkpoints)
    start_tracking(accelerator, config, "distill")

    # ---- train ---------------------------------------------------------------------------
    started = time.perf_counter()
    history = train(accelerator, parts, state)
    train_seconds = time.perf_counter() - started

    # ---- held-out evaluation, the model folder with its card ----------------------------
    metrics = evaluate(accelerator, parts.model, eval_loader, table)
    log_heldout(accelerator, state["step"], metrics, baseline, teacher_metrics)

    def save(trained) -> None:
        info = card.card_info(config, inputs, trained, train_seconds, len(train_rows))
        card.save_model(trained, config, info, metrics, baseline, teacher_metrics)

    save_final(accelerator, parts.model, save)
    accelerator.end_training()
    return DistillResult(history, metrics, baseline, str(Path(config.output_dir)), teacher_metrics)


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
