"""Distill stage: collected token-level judge feedback → a reward model r_φ(ε, e) from the noise alone.

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

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.errors import ConfigError

logger = logging.getLogger("noisealign.distill")


@dataclass
class DistillConfig(BaseConfig):
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
    learning_rate: float = arg(3e-4, min=0, min_exclusive=True)
    """AdamW peak learning rate."""
    weight_decay: float = arg(0.01, min=0)
    """AdamW weight decay."""
    warmup_steps: int = arg(50, min=0)
    """Linear warm-up steps before the cosine decay."""
    max_grad_norm: float = arg(1.0, min=0)
    """Gradient clipping norm; 0 turns clipping off."""
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
    logging_steps: int = arg(10, min=1)
    """Log train metrics every this many steps."""
    eval_steps: int = arg(200, min=0)
    """Evaluate on held-out prompts every this many steps (0: only at the end)."""
    save_steps: int = arg(200, min=1)
    """Checkpoint (accelerate save_state) every this many steps."""
    save_total_limit: int = arg(2, min=0)
    """Checkpoints kept (0 keeps all)."""
    resume_from_checkpoint: str | None = None
    """'latest' or a checkpoint folder to resume from."""
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
    # ---- 1. recipe and the accelerator (before touching the output folder) ----------
    config = parse_config(DistillConfig, args)
    from accelerate.utils import set_seed

    from noisealign.data.feedback import clean_feedback, load_feedback, split_by_prompt
    from noisealign.data.prompts import check_not_heldout
    from noisealign.outputs import check_output_dir_against_inputs
    from noisealign.pipelines import latent_shape, load_pipeline, pipeline_signature
    from noisealign.rewards import build_reward_model, stage
    from noisealign.rewards.features import (
        check_rows_fit_pipeline,
        encode_prompt_table,
        precompute_features,
    )
    from noisealign.rewards.trainer import (
        check_output_dir,
        evaluate,
        gathered_copy,
        load_checkpoint,
        resolve_checkpoint,
        train,
    )
    from noisealign.tracking import make_accelerator, start_tracking

    accelerator = make_accelerator(
        config, gradient_accumulation_steps=config.gradient_accumulation_steps
    )

    # ---- 2. rows, split, pipeline checks (all before any output is written) ----------
    check_output_dir_against_inputs(
        config.output_dir,
        {"dataset": config.dataset, "pipeline": config.pipeline, "teacher": config.teacher},
        stage="distill",
        overwrite=config.overwrite_output_dir,
    )
    rows = clean_feedback(load_feedback(config.dataset))
    check_not_heldout(config.dataset, rows.prompt_ids)  # the evaluation prompts stay unseen
    # the validation split below is drawn from the collected (training) prompts only
    train_ids, eval_ids = split_by_prompt(
        rows.prompt_ids, config.eval_fraction, config.min_eval_prompts, stage.split_seed(config)
    )
    check_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    resume = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(accelerator.device)
    prompt_order = sorted(set(rows.prompt_ids))
    first_prompt = {pid: p for pid, p in zip(rows.prompt_ids, rows.prompts)}
    table = encode_prompt_table(
        pipe, [first_prompt[pid] for pid in prompt_order], config.feature_batch_size
    )
    check_rows_fit_pipeline(rows, table, prompt_order, latent_shape(pipe)[0], config.pipeline)
    signature = pipeline_signature(pipe)
    teacher = None
    if config.teacher:
        from noisealign.rewards.loading import load_reward_model
        from noisealign.rewards.teacher import check_teacher_split

        teacher = load_reward_model(config.teacher, expected_signature=signature)
        check_teacher_split(config.teacher, eval_ids)
        teacher.to(accelerator.device)
    model_config = stage.model_fields(config, rows, signature)
    set_seed(config.seed)  # the model's initial weights, identical on every process
    model = build_reward_model(config.reward_model, **model_config)
    logger.info(
        "%d usable rows (%d failed, %d NaN/Inf skipped); %d train / %d held-out prompts; %s with %d parameters",
        len(rows),
        rows.skipped_failed,
        len(rows.skipped_nonfinite),
        len(train_ids),
        len(eval_ids),
        config.reward_model,
        sum(p.numel() for p in model.parameters()),
    )

    # ---- 3. training rows (the judge's, or the teacher's labels of fresh noises) ---------
    eval_rows = rows.select(stage.indices(rows, eval_ids))
    train_rows = rows.select(stage.indices(rows, train_ids))
    teacher_metrics = None
    if teacher is not None:
        train_rows, teacher_metrics = stage.teacher_training_rows(
            accelerator, config, teacher, pipe, table, prompt_order, rows, train_ids, eval_rows
        )
        del teacher

    # ---- 4. inputs: k-step features with the frozen UNet, prompt-only baseline ----------
    started = time.perf_counter()
    features = tuple(
        precompute_features(
            pipe,
            part,
            table,
            prompt_order,
            steps=config.input_steps,
            kind=config.input_kind,
            batch_size=config.feature_batch_size,
        )
        for part in (train_rows, eval_rows)
    )
    if features[0] is not None:
        logger.info(
            "k = %d features of %d rows in %.1f s",
            config.input_steps,
            len(train_rows) + len(eval_rows),
            time.perf_counter() - started,
        )
    del pipe  # the UNet variant copied what it needs
    baseline = stage.baseline_metrics(rows, table, prompt_order, train_ids, eval_ids)
    logger.info("prompt-only baseline on held-out prompts: %s", stage.rounded(baseline))

    # ---- 5. data loaders, optimizer, resume; trackers start once all checks passed ------
    parts = stage.build_parts(
        config, train_rows, eval_rows, prompt_order, features, model, accelerator.num_processes
    )
    # the eval loader stays unprepared: every process scores the whole (small) held-out set
    names = ("model", "optimizer", "train_loader", "lr_scheduler")
    parts.update(zip(names, accelerator.prepare(*(parts[n] for n in names))))
    device_table = stage.device_table(table, accelerator.device)
    saved_config = json.loads(json.dumps(asdict(model.config)))
    state = {"step": 0, "batches": 0}
    if resume is not None:
        state = load_checkpoint(accelerator, resume, saved_config)
    elif config.overwrite_output_dir and accelerator.is_main_process:
        shutil.rmtree(Path(config.output_dir, "checkpoints"), ignore_errors=True)
    accelerator.wait_for_everyone()
    start_tracking(accelerator, config, "distill")

    # ---- 6. train ------------------------------------------------------------------------
    started = time.perf_counter()
    history = train(
        accelerator,
        parts,
        device_table,
        stage.loss_settings(config),
        stage.schedule(config),
        state,
        config.output_dir,
        saved_config,
    )
    train_seconds = time.perf_counter() - started

    # ---- 7. held-out evaluation, model folder with its card ------------------------------
    metrics = evaluate(accelerator, parts["model"], parts["eval_loader"], device_table)
    accelerator.log(
        {f"eval/{k}": v for k, v in metrics.items()}
        | {f"baseline/{k}": v for k, v in baseline.items()}
        | {f"teacher/{k}": v for k, v in (teacher_metrics or {}).items()},
        step=state["step"],
    )
    logger.info(
        "held-out metrics: %s (prompt-only baseline: %s)",
        stage.rounded(metrics),
        stage.rounded(baseline),
    )
    trained = gathered_copy(accelerator, parts["model"])  # every process: FSDP gathers shards
    if trained is not None:
        info = stage.card_info(
            config, rows, signature, train_ids, eval_ids, trained, train_seconds, len(train_rows)
        )
        stage.save_model(trained, config, info, metrics, baseline, teacher_metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return DistillResult(history, metrics, baseline, str(Path(config.output_dir)), teacher_metrics)


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
