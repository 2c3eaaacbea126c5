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

from noisealign.configs import BaseConfig, arg, parse_config
from noisealign.data.schema import CollectRow, collect_features, feedback_columns
from noisealign.generation import GenerationSettings, JudgedRun, my_chunks, open_run
from noisealign.judges.base import score_robustly
from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts, generate

logger = logging.getLogger("noisealign.collect")


@dataclass
class CollectConfig(GenerationSettings, BaseConfig):
    """Recipe of the collect stage."""

    batch_size: int = arg(8, min=1)
    """Images generated and judged per batch, per process."""
    save_images: bool = False
    """Store each image in the dataset."""
    save_noise: bool = False
    """Store each initial noise (it is re-derivable from the seed)."""
    log_images: int = arg(16, min=0)
    """Sample images logged to the tracker as a table."""

    row_fields = ("save_images", "save_noise")


CONFIG_CLASS = CollectConfig  # read by `noisealign.cli` and the recipe tests


def collect_chunk(chunk, records, pipe, judge, config, shape) -> list[tuple[dict, object]]:
    """Generate, judge and build the rows of one chunk of (prompt id, seed) keys; each row comes
    with its image (kept in memory for the tracker's sample table)."""
    rows = []
    for start in range(0, len(chunk), config.batch_size):
        keys = chunk[start : start + config.batch_size]
        batch = [records[pid] for pid, _ in keys]
        prompts = [r.prompt for r in batch]
        latents = batch_noise([pid for pid, _ in keys], [seed for _, seed in keys], shape)
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
            row = CollectRow(
                prompt_id=pid,
                prompt=prompts[i],
                seed=seed,
                pipeline=config.pipeline,
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                height=images[i].height,
                width=images[i].width,
                latent_shape=list(shape),
                judge=judge.name,
                **feedback_columns(feedback, error, embeds.tokens[i], embeds.offsets[i]),
                image=images[i] if config.save_images else None,
                noise=latents[i].numpy() if config.save_noise else None,
            )
            rows.append((row.to_dict(), images[i]))
    return rows


def collect_shards(run: JudgedRun, config: CollectConfig, mine) -> tuple[list[dict], int]:
    """Generate, judge and write this process's chunks; (tracker samples, failed judge rows)."""
    features = collect_features(run.shape, config.save_images, config.save_noise)
    samples, failed, done = [], 0, 0
    progress = tqdm(
        total=sum(map(len, mine)), desc="collect", disable=not run.accelerator.is_local_main_process
    )
    for chunk in mine:
        started = time.perf_counter()
        pairs = collect_chunk(chunk, run.records, run.pipe, run.judge, config, run.shape)
        rows = [row for row, _ in pairs]
        wanted = max(0, config.log_images - len(samples))
        samples.extend({**row, "_image": image} for row, image in pairs[:wanted])
        run.store.write_shard(rows, features)
        failed += sum(r["failed"] for r in rows)
        done += len(rows)
        scores = [r["overall"] for r in rows if not r["failed"]]
        run.accelerator.log(
            {
                "collect/overall": sum(scores) / max(1, len(scores)),
                "collect/failed": failed,
                "collect/images_per_s": len(rows) / (time.perf_counter() - started),
            },
            step=done,
        )
        progress.update(len(rows))
    progress.close()
    return samples, failed


def main(args: Sequence[str] | None = None):
    """Run the collect stage; returns the merged dataset (on the main process)."""
    # ---- 1. recipe ------------------------------------------------------------------
    config = parse_config(CollectConfig, args)

    # ---- 2. prompts, output folder, models, processes (every check before any output)
    run = open_run(config, "collect", {"pipeline": config.pipeline})

    # ---- 3. plan: every process cuts the same chunks, then takes its share ---------
    mine = my_chunks(run, config.chunk_size)

    # ---- 4. generate, judge, write shard by shard ----------------------------------
    samples, failed = collect_shards(run, config, mine)

    # ---- 5. merge, report -----------------------------------------------------------
    accelerator = run.accelerator
    failed = int(
        accelerator.reduce(torch.tensor(failed, device=accelerator.device), reduction="sum")
    )
    accelerator.wait_for_everyone()
    dataset = None
    if accelerator.is_main_process:
        dataset = run.store.merge(run.keys)
        ok = [s for s in dataset["overall"] if s == s]
        logger.info(
            "dataset of %d rows at %s; mean overall %.3f; %d failed judge rows",
            len(dataset),
            run.store.dataset_dir,
            sum(ok) / max(1, len(ok)),
            failed,
        )
        _log_samples(accelerator, samples)
    accelerator.end_training()
    return dataset


def _log_samples(accelerator, samples: list[dict]) -> None:
    if not samples or not accelerator.trackers:
        return
    import wandb  # optional and slow to import: only when a tracker logs the samples

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
