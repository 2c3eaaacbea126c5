"""Collect stage: prompts × seeds → images → a judge's token-level feedback → a dataset.

Launch (any of):
    accelerate launch src/noisealign/collect.py --config recipes/toy/collect.yaml
    python -m noisealign.collect --config recipes/toy/collect.yaml
    noisealign collect --config recipes/toy/collect.yaml --output_dir runs/collect

Work is cut into chunks of ``chunk_size`` (prompt, seed) keys; process r takes chunks
r, r+N, ...; each chunk is written atomically as a shard, so a killed run restarted with
the same command finishes with every key exactly once (see :mod:`noisealign.data.shards`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, check_seeds, parse_config

logger = logging.getLogger("noisealign.collect")


@dataclass
class CollectConfig(BaseConfig):
    """Recipe of the collect stage."""

    pipeline: str = arg("", required=True)
    """Diffusers pipeline folder or hub id. Required."""
    judge: str = arg("", required=True)
    """Registered judge name (e.g. 'shapes', 'vlm', 'clip'). Required."""
    judge_kwargs: dict = arg({})
    """Arguments of the judge factory (JSON on the command line)."""
    prompts: str = arg("", required=True)
    """Prompt file: .txt, .jsonl, .csv or a saved dataset folder. Required."""
    prompt_column: str = "prompt"
    """Column holding the prompt in JSONL/CSV/dataset files."""
    seeds: str = arg("0:4", check=check_seeds)
    """Seeds per prompt: 'start:stop', 'a,b,c', or a YAML list of ints."""
    num_inference_steps: int = arg(20, min=1)
    """Denoising steps per image."""
    guidance_scale: float = arg(5.0, min=0)
    """Classifier-free guidance scale."""
    height: int | None = arg(None, min=8, multiple_of=8)
    """Image height in pixels; the pipeline's default when unset."""
    width: int | None = arg(None, min=8, multiple_of=8)
    """Image width in pixels; the pipeline's default when unset."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16."""
    batch_size: int = arg(8, min=1)
    """Images generated and judged per batch, per process."""
    chunk_size: int = arg(64, min=1)
    """Keys per shard. A kill loses at most one unfinished chunk per process."""
    save_images: bool = False
    """Store each image in the dataset."""
    save_noise: bool = False
    """Store each initial noise (it is re-derivable from the seed)."""
    exploration_images: str | None = None
    """An earlier collect dataset with images (save_images: true): each row's noise becomes √(1−γ)·ε
    + √γ·z with z the VAE latent of an image of the same prompt and γ ~ U(0, exploration_gamma), so
    the rows cover layouts standard noise rarely reaches (noisealign.data.exploration). The mixed
    noise is stored (save_noise)."""
    exploration_gamma: float = arg(0.2, min=0, min_exclusive=True, max=1)
    """Largest γ of the exploration mix (γ is drawn per row)."""
    judge_retries: int = arg(2, min=0)
    """Per-sample retries after a judge fails on a batch."""
    log_images: int = arg(16, min=0)
    """Sample images logged to the tracker as a table."""

    def __post_init__(self) -> None:
        if isinstance(self.seeds, list):  # a YAML list arrives untouched by argparse
            self.seeds = ",".join(str(s) for s in self.seeds)
        super().__post_init__()  # types and the limits in each field's metadata
        if self.exploration_images:
            self.save_noise = True  # the mixed noise is not re-derivable from the seed alone

    def fingerprint(self) -> dict:
        """Settings that decide a row's content; a folder written with others is refused."""
        keys = (
            "pipeline",
            "judge",
            "judge_kwargs",
            "prompt_column",
            "num_inference_steps",
            "guidance_scale",
            "height",
            "width",
            "torch_dtype",
            "save_images",
            "save_noise",
        )
        if self.exploration_images:  # absent otherwise, so folders written before it still resume
            keys += ("exploration_images", "exploration_gamma")
        return {k: getattr(self, k) for k in keys}


CONFIG_CLASS = CollectConfig  # read by `noisealign.cli` and the recipe tests


def collect_chunk(chunk, records, pipe, judge, config, shape, explore=None) -> list[dict]:
    """Generate, judge and build the rows of one chunk of (prompt id, seed) keys."""
    from noisealign.data.schema import feedback_columns
    from noisealign.judges.base import score_robustly
    from noisealign.noise import batch_noise
    from noisealign.pipelines import encode_prompts, generate

    rows = []
    for start in range(0, len(chunk), config.batch_size):
        keys = chunk[start : start + config.batch_size]
        batch = [records[pid] for pid, _ in keys]
        prompts = [r.prompt for r in batch]
        ids, seeds = [pid for pid, _ in keys], [seed for _, seed in keys]
        latents = batch_noise(ids, seeds, shape)
        gammas = None
        if explore is not None:
            latents, gammas = explore.mix(latents, ids, seeds)
        embeds = encode_prompts(pipe, prompts)
        images = generate(
            pipe,
            embeds,
            latents,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
        )
        concepts = [copy.deepcopy(list(r.concepts)) if r.concepts else None for r in batch]
        verdicts = score_robustly(judge, images, prompts, concepts, retries=config.judge_retries)
        for i, ((pid, seed), (feedback, error)) in enumerate(zip(keys, verdicts)):
            row = {
                "prompt_id": pid,
                "prompt": prompts[i],
                "seed": seed,
                "pipeline": config.pipeline,
                "num_inference_steps": config.num_inference_steps,
                "guidance_scale": config.guidance_scale,
                "height": images[i].height,
                "width": images[i].width,
                "latent_shape": list(shape),
                "judge": judge.name,
                **feedback_columns(feedback, error, embeds.tokens[i], embeds.offsets[i]),
            }
            if config.save_images:
                row["image"] = images[i]
            if config.save_noise:
                row["noise"] = latents[i].numpy()
            if gammas is not None:
                row["exploration_gamma"] = gammas[i]
            row["_image"] = images[i]  # kept in memory for the tracker's sample table only
            rows.append(row)
    return rows


def main(args: Sequence[str] | None = None):
    """Run the collect stage; returns the merged dataset (on the main process)."""
    # ---- 1. recipe, prompts, work list --------------------------------------------
    config = parse_config(CollectConfig, args)
    from noisealign.data.prompts import (
        heldout_record,
        load_training_prompts,
        parse_seeds,
        save_heldout_record,
    )
    from noisealign.data.schema import collect_features
    from noisealign.data.shards import ShardStore
    from noisealign.judges import build_judge
    from noisealign.outputs import check_output_dir_against_inputs
    from noisealign.pipelines import latent_shape, load_pipeline
    from noisealign.tracking import make_accelerator, start_tracking

    # held-out prompts (split 'eval') never reach a training input; heldout.json records them
    records = {r.prompt_id: r for r in load_training_prompts(config.prompts, config.prompt_column)}
    seeds = parse_seeds(config.seeds)
    keys = [(pid, seed) for pid in records for seed in seeds]

    # ---- 2. output folder, models, processes (all checks before any tracker run) ----
    store = ShardStore(config.output_dir, key_columns=("prompt_id", "seed"))
    check_output_dir_against_inputs(
        config.output_dir,
        {"pipeline": config.pipeline, "exploration_images": config.exploration_images},
        stage="collect",
        overwrite=config.overwrite_output_dir,
    )
    accelerator = make_accelerator(config)
    # after the Accelerator, so a judge's default device is this rank's; before the folder
    # is claimed, so an unknown judge or a bad judge_kwargs leaves no recipe.json behind
    judge = build_judge(config.judge, **config.judge_kwargs)
    # the pipeline loads before the folder is claimed: a mistyped path must not leave a
    # recipe.json that refuses the corrected recipe
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(accelerator.device)
    logger.info(
        "process %d on %s: pipeline on %s, judge %r",
        accelerator.process_index,
        accelerator.device,
        pipe.device,
        judge,
    )
    # the size check against the pipeline precedes the claim: a refused height leaves no recipe.json
    shape = latent_shape(pipe, config.height, config.width)
    explore = None
    if config.exploration_images:
        from noisealign.data.exploration import ExplorationSource

        explore = ExplorationSource(config.exploration_images, pipe, config.exploration_gamma)
    if accelerator.is_main_process:
        store.prepare(config.fingerprint(), overwrite=config.overwrite_output_dir)
        save_heldout_record(store.root, heldout_record(config.prompts, config.prompt_column))
    accelerator.wait_for_everyone()
    start_tracking(accelerator, config, "collect")
    features = collect_features(
        shape, config.save_images, config.save_noise, exploration=explore is not None
    )

    # ---- 3. plan: every process cuts the same chunks, then takes its share ---------
    chunks = store.plan(keys, config.chunk_size)
    accelerator.wait_for_everyone()  # nobody writes before everyone has read the done keys
    mine = chunks[accelerator.process_index :: accelerator.num_processes]
    logger.info(
        "%d of %d keys to collect; process %d takes %d chunks",
        sum(map(len, chunks)),
        len(keys),
        accelerator.process_index,
        len(mine),
    )

    # ---- 4. generate, judge, write shard by shard ----------------------------------
    samples, failed, done = [], 0, 0
    progress = tqdm(
        total=sum(map(len, mine)), desc="collect", disable=not accelerator.is_local_main_process
    )
    for chunk in mine:
        started = time.perf_counter()
        rows = collect_chunk(chunk, records, pipe, judge, config, shape, explore)
        samples.extend(dict(r) for r in rows[: max(0, config.log_images - len(samples))])
        for row in rows:
            row.pop("_image")
        store.write_shard(rows, features)
        failed += sum(r["failed"] for r in rows)
        done += len(rows)
        scores = [r["overall"] for r in rows if not r["failed"]]
        accelerator.log(
            {
                "collect/overall": sum(scores) / max(1, len(scores)),
                "collect/failed": failed,
                "collect/images_per_s": len(rows) / (time.perf_counter() - started),
            },
            step=done,
        )
        progress.update(len(rows))
    progress.close()

    # ---- 5. merge, report -----------------------------------------------------------
    failed = int(
        accelerator.reduce(torch.tensor(failed, device=accelerator.device), reduction="sum")
    )
    accelerator.wait_for_everyone()
    dataset = None
    if accelerator.is_main_process:
        dataset = store.merge(keys)
        ok = [s for s in dataset["overall"] if s == s]
        logger.info(
            "dataset of %d rows at %s; mean overall %.3f; %d failed judge rows",
            len(dataset),
            store.dataset_dir,
            sum(ok) / max(1, len(ok)),
            failed,
        )
        _log_samples(accelerator, samples)
    accelerator.end_training()
    return dataset


def _log_samples(accelerator, samples: list[dict]) -> None:
    if not samples or not accelerator.trackers:
        return
    import wandb

    columns = ["image", "prompt", "seed", "overall", "concepts"]
    table = wandb.Table(columns=columns)
    for row in samples:
        concepts = ", ".join(f"{c['text']}={c['score']:.2f}" for c in row["concepts"])
        table.add_data(
            wandb.Image(row["_image"]), row["prompt"], row["seed"], row["overall"], concepts
        )
    accelerator.log({"collect/samples": table})


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
