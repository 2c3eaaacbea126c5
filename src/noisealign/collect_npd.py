"""collect_npd stage: noise pairs by re-denoise sampling, filtered by a judge (Golden Noise,
arXiv 2411.09502, Alg. 1).

Launch (any of):
    accelerate launch src/noisealign/collect_npd.py --config recipes/toy/collect_npd.yaml
    python -m noisealign.collect_npd --config recipes/tiny/collect_npd.yaml
    noisealign collect_npd --config recipes/tiny/collect_npd.yaml --output_dir runs/npd

For every (prompt, seed): the source noise x_T (``noisealign.noise``, keyed by the pair), the
target x′_T = DDIM-Inversion(DDIM(x_T)) — one DDIM step at CFG ω_l, one inversion step at
ω_w < ω_l — an image from each at the recipe's sampling settings, the judge's score of both,
and kept = s′ > s + m. Every pair is written (with its flag), sharded, resumable and merged
exactly like the collect stage (:mod:`noisealign.data.shards`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from noisealign.configs import BaseConfig, arg, parse_config
from noisealign.data.npd import keep_pair, npd_features
from noisealign.generation import GenerationSettings, JudgedRun, my_chunks, open_run
from noisealign.judges.base import score_robustly
from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts, generate, pipeline_signature, re_denoise

logger = logging.getLogger("noisealign.collect_npd")


@dataclass
class CollectNPDConfig(GenerationSettings, BaseConfig):
    """Recipe of the collect_npd stage (the judge scores both images of a pair)."""

    redenoise_steps: int = arg(10, min=1)
    """Length of the schedule whose first step re-denoise sampling takes (paper: 10 for SDXL): DDIM,
    or flow-matching Euler for SD3 / FLUX."""
    guidance_denoise: float = arg(5.5, min=0)
    """ω_l: CFG of the denoising step (paper, SDXL: 5.5); FLUX.1-dev's distilled guidance."""
    guidance_invert: float = arg(1.0, min=0)
    """ω_w < ω_l: CFG of the inversion step (paper: 1.0); the gap injects the prompt."""
    margin: float = 0.0
    """m: a pair is kept when judge(x′_0) > judge(x_0) + m (paper: 0)."""
    batch_size: int = arg(8, min=1)
    """Pairs re-denoised per batch, per process (2x this many images)."""
    log_images: int = arg(8, min=0)
    """Source | target image pairs logged to the tracker as a table."""

    row_fields = ("redenoise_steps", "guidance_denoise", "guidance_invert", "margin")

    def __post_init__(self) -> None:
        super().__post_init__()  # seeds, types and the limits in each field's metadata
        if self.guidance_invert >= self.guidance_denoise:
            logger.warning(
                "guidance_invert %.2f >= guidance_denoise %.2f: re-denoise sampling injects no "
                "prompt semantics without a CFG gap (Theorem E.1); the paper uses 1.0 < 5.5",
                self.guidance_invert,
                self.guidance_denoise,
            )


CONFIG_CLASS = CollectNPDConfig  # read by `noisealign.cli` and the recipe tests


def pair_row(config, key, prompt, noises, verdicts, judge, shape, image, signature) -> dict:
    """One NPD row: both noises, both judge verdicts ((feedback, error) pairs), the settings."""
    (pid, seed), (source, target) = key, noises
    (src, src_error), (tgt, tgt_error) = verdicts
    s = float("nan") if src is None else float(src.overall)
    t = float("nan") if tgt is None else float(tgt.overall)
    return {
        "prompt_id": pid,
        "prompt": prompt,
        "seed": seed,
        "source_noise": source.numpy(),
        "target_noise": target.numpy(),
        "source_score": s,
        "target_score": t,
        "kept": keep_pair(s, t, config.margin),
        "failed": src is None or tgt is None,
        "error": src_error or tgt_error,
        "judge": judge.name,
        "margin": config.margin,
        "pipeline": config.pipeline,
        "pipeline_signature": signature,
        "latent_shape": list(shape),
        "height": image.height,
        "width": image.width,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "redenoise_steps": config.redenoise_steps,
        "guidance_denoise": config.guidance_denoise,
        "guidance_invert": config.guidance_invert,
    }


def collect_pairs(chunk, records, pipe, judge, config, shape, signature: str) -> list[dict]:
    """Re-denoise, generate from both noises, judge both and build the rows of one chunk of keys
    (each row carries its two images under '_images', for the tracker's sample table only)."""
    rows = []
    for start in range(0, len(chunk), config.batch_size):
        keys = chunk[start : start + config.batch_size]
        prompts = [records[pid].prompt for pid, _ in keys]
        source = batch_noise([pid for pid, _ in keys], [seed for _, seed in keys], shape)
        emb = encode_prompts(pipe, prompts)
        target = re_denoise(
            pipe,
            source,
            emb,
            num_inference_steps=config.redenoise_steps,
            guidance_denoise=config.guidance_denoise,
            guidance_invert=config.guidance_invert,
        )
        target = target.float().cpu()
        both = generate(
            pipe,
            emb.select(list(range(len(keys))) * 2),
            torch.cat([source, target]),
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
        )
        # a fresh copy per image: judges write their scores into the concepts they are given
        concepts = [
            copy.deepcopy(list(records[pid].concepts)) if records[pid].concepts else None
            for pid, _ in keys * 2
        ]
        verdicts = score_robustly(judge, both, prompts * 2, concepts, retries=config.judge_retries)
        n = len(keys)
        for i, key in enumerate(keys):
            noises, pair = (source[i], target[i]), (verdicts[i], verdicts[n + i])
            row = pair_row(config, key, prompts[i], noises, pair, judge, shape, both[i], signature)
            rows.append({**row, "_images": (both[i], both[n + i])})
    return rows


def collect_shards(run: JudgedRun, config: CollectNPDConfig, mine, signature: str) -> list:
    """Re-denoise, generate, judge and write this process's chunks; returns tracker samples."""
    samples, counts = [], {"done": 0, "kept": 0, "failed": 0}
    bar = tqdm(
        total=sum(map(len, mine)),
        desc="collect_npd",
        disable=not run.accelerator.is_local_main_process,
    )
    for chunk in mine:
        started = time.perf_counter()
        rows = collect_pairs(chunk, run.records, run.pipe, run.judge, config, run.shape, signature)
        for row in rows:
            images = row.pop("_images")
            if len(samples) < config.log_images:
                scores = (row["source_score"], row["target_score"])
                samples.append((row["prompt"], row["seed"], *images, *scores))
        run.store.write_shard(rows, npd_features(run.shape))
        counts = {
            "done": counts["done"] + len(rows),
            "kept": counts["kept"] + sum(r["kept"] for r in rows),
            "failed": counts["failed"] + sum(r["failed"] for r in rows),
        }
        judged = [r for r in rows if not r["failed"]]
        n = max(1, len(judged))
        run.accelerator.log(
            {
                "collect_npd/keep_rate": counts["kept"] / counts["done"],
                "collect_npd/source_score": sum(r["source_score"] for r in judged) / n,
                "collect_npd/target_score": sum(r["target_score"] for r in judged) / n,
                "collect_npd/failed": counts["failed"],
                "collect_npd/pairs_per_s": len(rows) / (time.perf_counter() - started),
            },
            step=counts["done"],
        )
        bar.update(len(rows))
        bar.set_postfix(keep_rate=f"{counts['kept'] / counts['done']:.3f}")
    bar.close()
    return samples


def main(args: Sequence[str] | None = None):
    """Run the collect_npd stage; returns the merged dataset (on the main process)."""
    # ---- 1. recipe ------------------------------------------------------------------
    config = parse_config(CollectNPDConfig, args)

    # ---- 2. prompts, output folder, models, processes (every check before any output)
    run = open_run(config, "collect_npd", {"pipeline": config.pipeline})
    signature = json.dumps(pipeline_signature(run.pipe), sort_keys=True)

    # ---- 3. plan: every process cuts the same chunks, then takes its share ---------
    mine = my_chunks(run, config.chunk_size)

    # ---- 4. re-denoise, generate, judge, write shard by shard ----------------------
    samples = collect_shards(run, config, mine, signature)

    # ---- 5. merge, report -----------------------------------------------------------
    run.accelerator.wait_for_everyone()
    dataset = None
    if run.accelerator.is_main_process:
        dataset = run.store.merge(run.keys)
        report = summarize(dataset)
        logger.info(
            "dataset of %d pairs at %s; kept %d (keep-rate %.3f, margin %g); mean score "
            "source %.3f -> target %.3f; %d failed judge rows",
            report["pairs"],
            run.store.dataset_dir,
            report["kept"],
            report["keep_rate"],
            config.margin,
            report["source_score"],
            report["target_score"],
            report["failed"],
        )
        (run.store.root / "summary.json").write_text(json.dumps(report, indent=2))
        run.accelerator.log({f"collect_npd/final_{k}": v for k, v in report.items()})
        _log_samples(run.accelerator, samples)
    run.accelerator.end_training()
    return dataset


def summarize(dataset) -> dict[str, float]:
    """Pairs, kept, keep-rate (over all pairs), failed, mean source / target scores of the judged
    pairs."""
    kept, failed = sum(dataset["kept"]), sum(dataset["failed"])
    judged = [
        (s, t)
        for s, t, f in zip(dataset["source_score"], dataset["target_score"], dataset["failed"])
        if not f
    ]
    n = max(1, len(judged))
    return {
        "pairs": dataset.num_rows,
        "kept": kept,
        "keep_rate": kept / max(1, dataset.num_rows),
        "failed": failed,
        "source_score": sum(s for s, _ in judged) / n,
        "target_score": sum(t for _, t in judged) / n,
        "target_better": sum(t > s for s, t in judged),
        "target_worse": sum(t < s for s, t in judged),
    }


def _log_samples(accelerator, samples: list[tuple]) -> None:
    if not samples or not accelerator.trackers:
        return
    import wandb  # optional and slow to import: only when a tracker logs the samples

    table = wandb.Table(
        columns=["prompt", "seed", "source", "target", "source_score", "target_score"]
    )
    for prompt, seed, src, tgt, s, t in samples:
        table.add_data(prompt, seed, wandb.Image(src), wandb.Image(tgt), s, t)
    accelerator.log({"collect_npd/samples": table})


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
