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
    """A Markdown table (pasted into the model card and docs/toy_world.md)."""
    n = result["seeds"]
    lines = [
        f"Guidance {result['guidance']}, {result['steps']} DDIM steps, seeds 0-{n - 1} per prompt "
        f"(noise from `batch_noise`), strict overall score; {result['seconds_per_image']:.3f} s "
        "per image including the judge.",
        "",
        f"| split | prompts | mean | best-of-4 | best-of-8 | worst-of-{n} | colour | shape | count | relation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for split in ("heldout", "seen", "single"):
        s = result[split]
        cells = [s["mean"], s.get("best_of_4", nan), s.get("best_of_8", nan), s[f"worst_of_{n}"]]
        cells += [s["acc_attribute"], s["acc_object"], s["acc_count"], s.get("acc_relation", nan)]
        lines.append(
            f"| {split} | {s['prompts']} | " + " | ".join(f"{c:.2f}" for c in cells) + " |"
        )
    return "\n".join(lines).replace("nan", "–")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
