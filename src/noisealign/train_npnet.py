"""train_npnet stage: NPNet trained with MSE on the kept noise pairs of collect_npd (Golden Noise, arXiv 2411.09502, Alg. 2).

Launch (any of):
    accelerate launch src/noisealign/train_npnet.py --config recipes/toy/train_npnet.yaml
    python -m noisealign.train_npnet --config recipes/tiny/train_npnet.yaml
    noisealign train_npnet --config recipes/tiny/train_npnet.yaml --output_dir runs/npnet

Each batch holds kept pairs (x_T, x′_T) of many prompts; every sample is conditioned on its
*own* prompt's token embeddings, encoded by the pipeline's frozen text encoder (the official
code gives the whole batch the first prompt's). Held-out prompts (no pair of theirs is trained
on) give an eval MSE next to the identity map's. Saves a policy folder that records its
pipeline; resume with ``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.errors import ConfigError

logger = logging.getLogger("noisealign.train_npnet")
POLICY_TYPES = ("npnet", "npnet_compat", "noise_projector")


@dataclass
class TrainNPNetConfig(BaseConfig):
    """Recipe of the train_npnet stage."""

    pipeline: str = arg("", required=True)
    """Pipeline (folder or hub id) the pairs were collected with; its text encoder embeds the
    prompts. Required."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16 (the policy trains in float32)."""
    dataset: str = arg("", required=True)
    """collect_npd output folder (or its dataset/). Required."""
    margin: float | None = None
    """Re-filter the pairs with this m (target score > source score + m); None uses the 'kept'
    column."""
    policy_type: str = arg("npnet", choices=POLICY_TYPES)
    """'npnet' (improved, any latent size, per-token prompt attention), 'npnet_compat' (official
    architecture, 4 x 128 x 128 only) or 'noise_projector' (the quasi-DPO projector regressed onto
    the pairs, e.g. as train_projector's init_from)."""
    policy_kwargs: dict = arg({})
    """Size of the policy (NPNetConfig / NPNetCompatConfig / NoiseProjectorConfig fields, e.g.
    hidden_dim, depth)."""
    init_from: str | None = None
    """Start from this policy folder (e.g. a converted official checkpoint) instead of fresh
    weights."""
    eval_fraction: float = arg(0.1, min=0, min_exclusive=True, max=1, max_exclusive=True)
    """Share of the prompts held out (all their pairs) for the eval MSE."""
    min_eval_prompts: int = arg(1, min=1)
    """At least this many held-out prompts."""
    batch_size: int = arg(64, min=1)
    """Pairs per process per forward (paper: 64)."""
    gradient_accumulation_steps: int = arg(1, min=1)
    """Forwards per optimizer step."""
    num_epochs: int = arg(30, min=1)
    """Passes over the training pairs (paper: 30); ignored when max_steps is set."""
    max_steps: int | None = arg(None, min=1)
    """Optimizer steps; overrides num_epochs."""
    learning_rate: float = arg(1e-4, min=0, min_exclusive=True)
    """AdamW learning rate (paper: 1e-4), constant after warm-up."""
    weight_decay: float = arg(0.0, min=0)
    """AdamW weight decay."""
    warmup_steps: int = arg(0, min=0)
    """Linear warm-up steps."""
    max_grad_norm: float = arg(1.0, min=0)
    """Gradient clipping norm; 0 turns clipping off."""
    logging_steps: int = arg(10, min=1)
    """Log train metrics every this many steps."""
    eval_steps: int = arg(0, min=0)
    """Held-out evaluation every this many steps (0: only at the end)."""
    save_steps: int = arg(500, min=1)
    """Checkpoint (accelerate save_state) every this many steps, and at the end."""
    save_total_limit: int = arg(2, min=0)
    """Checkpoints kept (0 keeps all)."""
    resume_from_checkpoint: str | None = None
    """'latest' or a checkpoint folder to resume from."""


CONFIG_CLASS = TrainNPNetConfig  # read by `noisealign.cli` and the recipe tests


@dataclass
class TrainNPNetResult:
    """What :func:`main` returns: per-step train metrics, the final held-out metrics, the saved folder."""

    history: list[dict[str, float]]
    metrics: dict[str, float]
    model_dir: str


def build_policy(config: TrainNPNetConfig, signature: dict, shape: tuple[int, int, int]):
    """A fresh policy (NPNet or noise projector) whose input sizes come from the pipeline and the pairs, its size from the recipe."""
    from noisealign.errors import PipelineError
    from noisealign.policies import POLICIES

    if config.policy_type in ("npnet", "noise_projector"):
        fields = dict(
            latent_channels=shape[0],
            text_dim=signature["text_embed_dim"],
            pooled_dim=signature["pooled_dim"],
        )
    else:  # the official architecture: one square 4-channel size, flattened (L, D) tokens
        if shape[0] != 4 or shape[1] != shape[2]:
            raise PipelineError(
                f"policy_type 'npnet_compat' takes square 4-channel latents, the pairs have {shape}; use policy_type 'npnet'"
            )
        fields = dict(
            resolution=shape[1],
            text_dim=signature["text_embed_dim"],
            text_length=signature["text_length"],
        )
    cls = POLICIES[config.policy_type]
    try:
        policy_config = cls.config_class(
            **{**fields, **config.policy_kwargs},
            pipeline_signature=signature,
            pipeline=config.pipeline,
        )
    except TypeError as exc:  # an unknown policy_kwargs key
        raise ConfigError(
            f"recipe field 'policy_kwargs' does not fit {cls.config_class.__name__}: {exc}"
        ) from exc
    torch.manual_seed(config.seed)  # the same initial weights on every process
    return cls(policy_config)


def batch_loss(
    model, pipe, pairs, batch: dict
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(loss, ε′, metrics) of one batch; each sample conditioned on its own prompt."""
    from noisealign.losses.noise_pairs import noise_pair_loss
    from noisealign.pipelines import encode_prompts

    emb = encode_prompts(pipe, [pairs.prompts[r] for r in batch["row"].tolist()])
    emb = emb.to(batch["source"].device, torch.float32)
    predicted = model(batch["source"], emb.embeds, emb.mask, emb.pooled)
    loss, metrics = noise_pair_loss(predicted, batch["target"], batch["source"])
    return loss, predicted.detach(), metrics


@torch.no_grad()
def evaluate(accelerator, model, pipe, pairs, loader) -> dict[str, float]:
    """Held-out MSE, the identity map's MSE, and ε′'s Gaussianity, over the whole held-out set.

    Every process scores every held-out pair (the set is small), so all log the same numbers.
    """
    from noisealign.policies.training import noise_metrics

    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        _, predicted, metrics = batch_loss(model, pipe, pairs, batch)
        n = len(batch["row"])
        for key, value in {**metrics, **noise_metrics(predicted, "eps_prime")}.items():
            sums[key] = sums.get(key, 0.0) + value * n
        count += n
    model.train()
    values = {k: v / count for k, v in sums.items()}
    values["relative_mse"] = values["mse"] / max(values["identity_mse"], 1e-12)
    return values


def train(accelerator, config, parts, pipe, pairs, state, model_config) -> list[dict[str, float]]:
    """Optimizer steps from ``state`` to ``parts['max_steps']``; batches depend only on (seed, epoch)."""
    from tqdm.auto import tqdm

    from noisealign.policies.training import noise_metrics
    from noisealign.rewards.trainer import save_checkpoint

    model, optimizer, scheduler = parts["model"], parts["optimizer"], parts["scheduler"]
    per_epoch, max_steps, history = len(parts["train_loader"]), parts["max_steps"], []
    bar = tqdm(
        total=max_steps,
        initial=state["step"],
        desc="train_npnet",
        disable=not accelerator.is_local_main_process,
    )
    model.train()
    while state["step"] < max_steps:
        epoch, skip = divmod(state["batches"], per_epoch)
        parts["sampler"].use_epoch(epoch)
        loader = parts["train_loader"]
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(model):
                loss, predicted, metrics = batch_loss(model, pipe, pairs, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    metrics["grad_norm"] = float(
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batches"] += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            bar.update(1)
            logged = {
                "step": state["step"],
                "epoch": epoch,
                "loss": accelerator.reduce(loss.detach(), reduction="mean").item(),
                "lr": scheduler.get_last_lr()[0],
                **metrics,
            }
            if state["step"] % config.logging_steps == 0 or state["step"] == 1:
                logged |= noise_metrics(predicted, "eps_prime")
                accelerator.log({f"train/{k}": v for k, v in logged.items()}, step=state["step"])
                bar.set_postfix(loss=f"{logged['loss']:.4f}", rel=f"{metrics['relative_mse']:.3f}")
            history.append(logged)
            if (
                config.eval_steps
                and state["step"] % config.eval_steps == 0
                and state["step"] < max_steps
            ):
                values = evaluate(accelerator, model, pipe, pairs, parts["eval_loader"])
                accelerator.log({f"eval/{k}": v for k, v in values.items()}, step=state["step"])
            if state["step"] % config.save_steps == 0 or state["step"] == max_steps:
                save_checkpoint(
                    accelerator, config.output_dir, state, model_config, config.save_total_limit
                )
            if state["step"] >= max_steps:
                break
    bar.close()
    return history


def build_parts(config, pairs, train_rows, eval_rows, model, num_processes: int) -> dict:
    """Unprepared loaders (row-level shuffling keyed by (seed, epoch)), AdamW and a constant schedule with warm-up."""
    from torch.utils.data import DataLoader
    from transformers import get_constant_schedule_with_warmup

    from noisealign.data.feedback import PromptBatchSampler
    from noisealign.data.npd import NoisePairDataset, pass_through

    train_set, eval_set = NoisePairDataset(pairs, train_rows), NoisePairDataset(pairs, eval_rows)
    # each pair is its own group: batches of `batch_size` pairs, reshuffled per epoch
    sampler = PromptBatchSampler(
        range(len(train_set)), config.batch_size, shuffle=True, seed=config.seed
    )
    eval_sampler = PromptBatchSampler(range(len(eval_set)), config.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    # accelerate steps a prepared scheduler once per process per optimizer step
    scheduler = get_constant_schedule_with_warmup(optimizer, config.warmup_steps * num_processes)
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "sampler": sampler,
        "train_loader": DataLoader(train_set, batch_sampler=sampler, collate_fn=pass_through),
        "eval_loader": DataLoader(eval_set, batch_sampler=eval_sampler, collate_fn=pass_through),
    }


def main(args: Sequence[str] | None = None) -> TrainNPNetResult:
    """Run the train_npnet stage; returns the history and held-out metrics (folder saved on the main process)."""
    # ---- 1. recipe and the accelerator (before touching the output folder) ----------
    config = parse_config(TrainNPNetConfig, args)
    from noisealign.data.feedback import split_by_prompt
    from noisealign.data.npd import check_pairs_fit_pipeline, load_noise_pairs
    from noisealign.data.prompts import check_not_heldout
    from noisealign.outputs import check_output_dir_against_inputs
    from noisealign.pipelines import load_pipeline, pipeline_signature
    from noisealign.rewards.trainer import (
        check_output_dir,
        gathered_copy,
        load_checkpoint,
        resolve_checkpoint,
    )
    from noisealign.tracking import make_accelerator, start_tracking

    accelerator = make_accelerator(
        config, gradient_accumulation_steps=config.gradient_accumulation_steps
    )

    # ---- 2. pairs, split, pipeline checks (all before any output is written) ----------
    check_output_dir_against_inputs(
        config.output_dir,
        {"dataset": config.dataset, "pipeline": config.pipeline, "init_from": config.init_from},
        stage="train_npnet",
        overwrite=config.overwrite_output_dir,
    )
    pairs = load_noise_pairs(config.dataset, config.margin)
    check_not_heldout(config.dataset, pairs.prompt_ids)  # the evaluation prompts stay unseen
    train_ids, eval_ids = split_by_prompt(
        pairs.prompt_ids, config.eval_fraction, config.min_eval_prompts, config.seed
    )
    held_out = set(eval_ids)
    train_rows = [i for i, pid in enumerate(pairs.prompt_ids) if pid not in held_out]
    eval_rows = [i for i, pid in enumerate(pairs.prompt_ids) if pid in held_out]
    check_output_dir(config.output_dir, config.resume_from_checkpoint, config.overwrite_output_dir)
    resume = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(accelerator.device)
    signature = pipeline_signature(pipe)
    check_pairs_fit_pipeline(pairs, signature, config.dataset)

    # ---- 3. policy, loaders, optimizer; resume; trackers -------------------------------
    if config.init_from:
        from noisealign.policies import load_policy

        model = load_policy(config.init_from, pipe).train()
    else:
        model = build_policy(config, signature, pairs.latent_shape)
    parts = build_parts(config, pairs, train_rows, eval_rows, model, accelerator.num_processes)
    names = ("model", "optimizer", "train_loader", "scheduler")
    parts.update(zip(names, accelerator.prepare(*(parts[n] for n in names))))
    steps_per_epoch = math.ceil(len(parts["train_loader"]) / config.gradient_accumulation_steps)
    parts["max_steps"] = config.max_steps or config.num_epochs * steps_per_epoch
    model_config = json.loads(json.dumps(asdict(accelerator.unwrap_model(parts["model"]).config)))
    state = {"step": 0, "batches": 0}
    if resume is not None:
        state = load_checkpoint(accelerator, resume, model_config)
    elif config.overwrite_output_dir and accelerator.is_main_process:
        shutil.rmtree(Path(config.output_dir, "checkpoints"), ignore_errors=True)
    accelerator.wait_for_everyone()
    start_tracking(accelerator, config, "train_npnet")
    logger.info(
        "%d kept pairs (%d not kept, %d NaN/Inf skipped): %d train pairs of %d prompts, %d held-out pairs of %d prompts; "
        "%s with %d parameters; %d steps",
        pairs.num_rows,
        pairs.skipped_not_kept,
        len(pairs.skipped_nonfinite),
        len(train_rows),
        len(train_ids),
        len(eval_rows),
        len(eval_ids),
        config.policy_type,
        sum(p.numel() for p in model.parameters()),
        parts["max_steps"],
    )

    # ---- 4. train ------------------------------------------------------------------------
    history = train(accelerator, config, parts, pipe, pairs, state, model_config)

    # ---- 5. held-out metrics; the policy folder (config records its pipeline) ------------
    metrics = evaluate(accelerator, parts["model"], pipe, pairs, parts["eval_loader"])
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state["step"])
    logger.info("held-out: %s", {k: round(v, 4) for k, v in metrics.items()})
    policy = gathered_copy(accelerator, parts["model"])
    if policy is not None:
        policy.save_pretrained(config.output_dir)
        summary = {
            "history": history,
            "eval": metrics,
            "train_pairs": len(train_rows),
            "eval_pairs": len(eval_rows),
            "train_prompts": train_ids,
            "eval_prompts": eval_ids,
        }
        Path(config.output_dir, "train_metrics.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainNPNetResult(history, metrics, str(Path(config.output_dir)))


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
