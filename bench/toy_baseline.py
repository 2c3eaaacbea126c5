"""Baseline alignment of the toy pipeline with standard Gaussian noise.

Generates every (prompt, seed) image from the project's deterministic noise
(``noisealign.noise.batch_noise``), scores it with the ``shapes`` judge, and reports per
split (held-out compositions, seen compositions, single objects): mean, best-of-4,
best-of-8, worst-of-8 and per-concept-kind accuracy. Prints one JSON line, then a summary.

    .venv/bin/python bench/toy_baseline.py                 # 24 + 24 + 12 prompts x 8 seeds
    .venv/bin/python bench/toy_baseline.py --pipeline outputs/toy/pretrain/pipeline
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
from diffusers import StableDiffusionPipeline

from noisealign.toy import pipeline_path
from noisealign.toy.evaluate import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate_and_judge, summarise
from noisealign.toy.grammar import prompt_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pipeline",
        default=str(pipeline_path()),
        help="pipeline folder (default: the committed toy pipeline)",
    )
    parser.add_argument(
        "--prompts",
        type=int,
        default=24,
        help="prompts per two-object split (all 12 singles are used)",
    )
    parser.add_argument("--seeds", type=int, default=8, help="seeds per prompt (0..N-1)")
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale"
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline)
    seeds = list(range(args.seeds))
    result: dict = {
        "pipeline": args.pipeline,
        "guidance": args.guidance,
        "steps": args.steps,
        "seeds": args.seeds,
    }
    started = time.time()
    for split, limit in (("heldout", args.prompts), ("seen", args.prompts), ("single", None)):
        rows = generate_and_judge(
            pipe, prompt_records(split, limit=limit), seeds, args.guidance, args.steps
        )
        result[split] = summarise(rows, args.seeds)
    images = sum(result[s]["images"] for s in ("heldout", "seen", "single"))
    result["seconds_per_image"] = (time.time() - started) / images
    print(json.dumps(result))
    print(_summary(result))
    return result


def _summary(result: dict) -> str:
    n = result["seeds"]
    lines = [
        f"toy baseline: guidance {result['guidance']}, {result['steps']} DDIM steps, {n} seeds per prompt, "
        f"{result['seconds_per_image']:.3f} s per image (incl. judge)"
    ]
    header = f"{'split':<8} {'prompts':>7} {'mean':>6} {'best4':>6} {'best8':>6} {'worst' + str(n):>7} {'colour':>7} {'shape':>6} {'count':>6} {'relation':>8}"
    lines.append(header)
    for split in ("heldout", "seen", "single"):
        s = result[split]
        lines.append(
            f"{split:<8} {s['prompts']:>7} {s['mean']:>6.3f} {s.get('best_of_4', float('nan')):>6.3f} "
            f"{s.get('best_of_8', float('nan')):>6.3f} {s[f'worst_of_{n}']:>7.3f} {s['acc_attribute']:>7.3f} "
            f"{s['acc_object']:>6.3f} {s['acc_count']:>6.3f} {s.get('acc_relation', float('nan')):>8.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
