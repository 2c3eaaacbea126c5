"""collect_npd stage: noise pairs by re-denoise sampling, filtered by a judge (Golden Noise, arXiv 2411.09502, Alg. 1).

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

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, check_seeds, parse_config

logger = logging.getLogger("noisealign.collect_npd")


@dataclass
class CollectNPDConfig(BaseConfig):
    """Recipe of the collect_npd stage."""

    pipeline: str = arg("", required=True)
    """Diffusers pipeline folder or hub id. Required."""
    judge: str = arg("", required=True)
    """Registered judge that scores both images (e.g. 'shapes', 'clip', 'vlm'). Required."""
    judge_kwargs: dict = arg({})
    """Arguments of the judge factory (JSON on the command line)."""
    prompts: str = arg("", required=True)
    """Prompt file: .txt, .jsonl, .csv or a saved dataset folder. Required."""
    prompt_column: str = "prompt"
    """Column holding the prompt in JSONL/CSV/dataset files."""
    seeds: str = arg("0:4", check=check_seeds)
    """Seeds per prompt: 'start:stop', 'a,b,c', or a YAML list of ints."""
    redenoise_steps: int = arg(10, min=1)
    """Length of the DDIM schedule whose first step re-denoise sampling takes (paper: 10 for SDXL).
    """
    guidance_denoise: float = arg(5.5, min=0)
    """ω_l: CFG of the DDIM step (paper, SDXL: 5.5)."""
    guidance_invert: float = arg(1.0, min=0)
    """ω_w < ω_l: CFG of the inversion step (paper: 1.0); the gap injects the prompt."""
    margin: float = 0.0
    """m: a pair is kept when judge(x′_0) > judge(x_0) + m (paper: 0)."""
    num_inference_steps: int = arg(20, min=1)
    """Denoising steps of the two judged images."""
    guidance_scale: float = arg(5.0, min=0)
    """CFG scale of the two judged images."""
    height: int | None = arg(None, min=8, multiple_of=8)
    """Image height in pixels; the pipeline's default when unset."""
    width: int | None = arg(None, min=8, multiple_of=8)
    """Image width in pixels; the pipeline's default when unset."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16 (noises are stored in float32)."""
    batch_size: int = arg(8, min=1)
    """Pairs re-denoised per batch, per process (2x this many images)."""
    chunk_size: int = arg(64, min=1)
    """Keys per shard. A kill loses at most one unfinished chunk per process."""
    judge_retries: int = arg(2, min=0)
    """Per-sample retries after a judge fails on a batch."""
    log_images: int = arg(8, min=0)
    """Source | target image pairs logged to the tracker as a table."""

    def __post_init__(self) -> None:
        if isinstance(self.seeds, list):  # a YAML list arrives untouched by argparse
            self.seeds = ",".join(str(s) for s in self.seeds)
        super().__post_init__()  # types and the limits in each field's metadata
        if self.guidance_invert >= self.guidance_denoise:
            logger.warning(
                "guidance_invert %.2f >= guidance_denoise %.2f: re-denoise sampling injects no prompt "
                "semantics without a CFG gap (Theorem E.1); the paper uses 1.0 < 5.5",
                self.guidance_invert,
                self.guidance_denoise,
            )

    def fingerprint(self) -> dict:
        """Settings that decide a row's content; a folder written with others is refused."""
        keys = (
            "pipeline",
            "judge",
            "judge_kwargs",
            "prompt_column",
            "redenoise_steps",
            "guidance_denoise",
            "guidance_invert",
            "margin",
            "num_inference_steps",
            "guidance_scale",
            "height",
            "width",
            "torch_dtype",
        )
        return {k: getattr(self, k) for k in keys}


CONFIG_CLASS = CollectNPDConfig  # read by `noisealign.cli` and the recipe tests


def collect_pairs(chunk, records, pipe, judge, config, shape, signature: str) -> list[dict]:
    """Re-denoise, generate from both noises, judge both and build the rows of one chunk of keys."""
    from noisealign.data.npd import keep_pair
    from noisealign.judges.base import score_robustly
    from noisealign.noise import batch_noise
    from noisealign.pipelines import encode_prompts, generate, re_denoise

    rows = []
    for start in range(0, len(chunk), config.batch_size):
        keys = chunk[start : start + config.batch_size]
        prompts = [records[pid].prompt for pid, _ in keys]
        source = batch_noise([pid for pid, _ in keys], [seed for _, seed in keys], shape)
        emb = encode_prompts(pipe, prompts)
        target = (
            re_denoise(
                pipe,
                source,
                emb,
                num_inference_steps=config.redenoise_steps,
                guidance_denoise=config.guidance_denoise,
                guidance_invert=config.guidance_invert,
            )
            .float()
            .cpu()
        )
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
        for i, (pid, seed) in enumerate(keys):
            (src, src_error), (tgt, tgt_error) = verdicts[i], verdicts[len(keys) + i]
            s = float("nan") if src is None else float(src.overall)
            t = float("nan") if tgt is None else float(tgt.overall)
            rows.append(
                {
                    "prompt_id": pid,
                    "prompt": prompts[i],
                    "seed": seed,
                    "source_noise": source[i].numpy(),
                    "target_noise": target[i].numpy(),
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
                    "height": both[i].height,
                    "width": both[i].width,
                    "num_inference_steps": config.num_inference_steps,
                    "guidance_scale": config.guidance_scale,
                    "redenoise_steps": config.redenoise_steps,
                    "guidance_denoise": config.guidance_denoise,
                    "guidance_invert": config.guidance_invert,
                    "_images": (
                        both[i],
                        both[len(keys) + i],
                    ),  # for the tracker's sample table only
                }
            )
    return rows


def main(args: Sequence[str] | None = None):
    """Run the collect_npd stage; returns the merged dataset (on the main process)."""
    # ---- 1. recipe, prompts, work list --------------------------------------------
    config = parse_config(CollectNPDConfig, args)
    from noisealign.data.npd import npd_features
    from noisealign.data.prompts import (
        heldout_record,
        load_training_prompts,
        parse_seeds,
        save_heldout_record,
    )
    from noisealign.data.shards import ShardStore
    from noisealign.judges import build_judge
    from noisealign.outputs import check_output_dir_against_inputs
    from noisealign.pipelines import latent_shape, load_pipeline, pipeline_signature
    from noisealign.tracking import make_accelerator, start_tracking

    # held-out prompts (split 'eval') never reach a training input; heldout.json records them
    records = {r.prompt_id: r for r in load_training_prompts(config.prompts, config.prompt_column)}
    keys = [(pid, seed) for pid in records for seed in parse_seeds(config.seeds)]

    # ---- 2. output folder, models, processes (all checks before any tracker run) ----
    store = ShardStore(config.output_dir, key_columns=("prompt_id", "seed"))
    check_output_dir_against_inputs(
        config.output_dir,
        {"pipeline": config.pipeline},
        stage="collect_npd",
        overwrite=config.overwrite_output_dir,
    )
    accelerator = make_accelerator(config)
    # after the Accelerator, so a judge's default device is this rank's; before the folder
    # is claimed, so an unknown judge or a bad judge_kwargs leaves no recipe.json behind
    judge = build_judge(config.judge, **config.judge_kwargs)
    # the pipeline and the image size are checked before the folder is claimed too
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
    shape = latent_shape(pipe, config.height, config.width)
    if accelerator.is_main_process:
        store.prepare(config.fingerprint(), overwrite=config.overwrite_output_dir)
        save_heldout_record(store.root, heldout_record(config.prompts, config.prompt_column))
    accelerator.wait_for_everyone()
    start_tracking(accelerator, config, "collect_npd")
    signature = json.dumps(pipeline_signature(pipe), sort_keys=True)

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

    # ---- 4. re-denoise, generate, judge, write shard by shard ----------------------
    samples, counts = [], {"done": 0, "kept": 0, "failed": 0}
    bar = tqdm(
        total=sum(map(len, mine)), desc="collect_npd", disable=not accelerator.is_local_main_process
    )
    for chunk in mine:
        started = time.perf_counter()
        rows = collect_pairs(chunk, records, pipe, judge, config, shape, signature)
        for row in rows:
            images = row.pop("_images")
            if len(samples) < config.log_images:
                samples.append(
                    (row["prompt"], row["seed"], *images, row["source_score"], row["target_score"])
                )
        store.write_shard(rows, npd_features(shape))
        counts = {
            "done": counts["done"] + len(rows),
            "kept": counts["kept"] + sum(r["kept"] for r in rows),
            "failed": counts["failed"] + sum(r["failed"] for r in rows),
        }
        judged = [r for r in rows if not r["failed"]]
        accelerator.log(
            {
                "collect_npd/keep_rate": counts["kept"] / counts["done"],
                "collect_npd/source_score": sum(r["source_score"] for r in judged)
                / max(1, len(judged)),
                "collect_npd/target_score": sum(r["target_score"] for r in judged)
                / max(1, len(judged)),
                "collect_npd/failed": counts["failed"],
                "collect_npd/pairs_per_s": len(rows) / (time.perf_counter() - started),
            },
            step=counts["done"],
        )
        bar.update(len(rows))
        bar.set_postfix(keep_rate=f"{counts['kept'] / counts['done']:.3f}")
    bar.close()

    # ---- 5. merge, report -----------------------------------------------------------
    accelerator.wait_for_everyone()
    dataset = None
    if accelerator.is_main_process:
        dataset = store.merge(keys)
        report = summarize(dataset)
        logger.info(
            "dataset of %d pairs at %s; kept %d (keep-rate %.3f, margin %g); mean score source %.3f -> target %.3f; %d failed judge rows",
            report["pairs"],
            store.dataset_dir,
            report["kept"],
            report["keep_rate"],
            config.margin,
            report["source_score"],
            report["target_score"],
            report["failed"],
        )
        (store.root / "summary.json").write_text(json.dumps(report, indent=2))
        accelerator.log({f"collect_npd/final_{k}": v for k, v in report.items()})
        _log_samples(accelerator, samples)
    accelerator.end_training()
    return dataset


def summarize(dataset) -> dict[str, float]:
    """Pairs, kept, keep-rate (over all pairs), failed, mean source / target scores of the judged pairs."""
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
    import wandb

    table = wandb.Table(
        columns=["prompt", "seed", "source", "target", "source_score", "target_score"]
    )
    for prompt, seed, src, tgt, s, t in samples:
        table.add_data(prompt, seed, wandb.Image(src), wandb.Image(tgt), s, t)
    accelerator.log({"collect_npd/samples": table})


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
