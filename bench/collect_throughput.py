"""collect stage throughput vs a bare ``pipe(...)`` + judge loop at the same batch size.

    OMP_NUM_THREADS=1 .venv/bin/python bench/collect_throughput.py [--prompts 64 --seeds 2 --batch 32]

Both sides run on the toy world in this process with the same settings (20 DDIM steps,
guidance 5, the ``shapes`` judge, the same keyed noises) and are timed from loading the
pipeline to having every score: the stage through ``noisealign.collect.main`` (prompt file,
token alignment, shards, merged dataset on disk, 1 process), the bare loop as a user would
write it: ``StableDiffusionPipeline.from_pretrained`` then, per batch,
``pipe(prompts, latents=...)`` and ``ShapesJudge().score``. A small run of each first warms
up torch; then the two sides alternate (collect, bare, bare, collect, ...) and the mean
times are compared, so drifting load on a shared machine hits both. Prints one JSON line
and a summary; the target is collect / bare >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.9


def bare_loop(prompts: list[str], ids: list[str], seeds: list[int], batch: int, steps: int) -> int:
    """What collect does, without the framework: generate and judge batch by batch."""
    from diffusers import StableDiffusionPipeline

    from noisealign.noise import batch_noise
    from noisealign.toy import pipeline_path
    from noisealign.toy.judge import ShapesJudge

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    judge = ShapesJudge()
    size = pipe.unet.config.sample_size
    keys = [(i, s) for i in range(len(prompts)) for s in seeds]
    scored = 0
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        texts = [prompts[i] for i, _ in chunk]
        latents = batch_noise([ids[i] for i, _ in chunk], [s for _, s in chunk], (4, size, size))
        images = pipe(texts, latents=latents, num_inference_steps=steps, guidance_scale=5.0).images
        scored += len(judge.score(images, texts))
    return scored


def run_collect(prompt_file: Path, out: Path, seeds: int, batch: int, steps: int) -> int:
    from noisealign import collect
    from noisealign.toy import pipeline_path

    dataset = collect.main(
        ["--pipeline", str(pipeline_path()), "--judge", "shapes", "--prompts", str(prompt_file),
         "--seeds", f"0:{seeds}", "--num_inference_steps", str(steps), "--guidance_scale", "5.0",
         "--batch_size", str(batch), "--chunk_size", str(2 * batch), "--report_to", "none",
         "--output_dir", str(out)]
    )  # fmt: skip
    return dataset.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs of each side.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from noisealign.data.prompts import load_prompts

    records = load_prompts(ROOT / "recipes/toy/prompts_train.jsonl")[: args.prompts]
    prompts, ids = [r.prompt for r in records], [r.prompt_id for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp, "prompts.jsonl")
        prompt_file.write_text(
            "".join(json.dumps({"prompt_id": i, "prompt": p}) + "\n" for i, p in zip(ids, prompts))
        )
        warm = Path(tmp, "warm.jsonl")
        warm.write_text(json.dumps({"prompt_id": ids[0], "prompt": prompts[0]}) + "\n")
        run_collect(warm, Path(tmp, "warm-out"), 1, args.batch, 2)
        bare_loop(prompts[:1], ids[:1], [0], args.batch, 2)

        # alternate the order (A B, B A, ...) so drifting load on a shared machine hits both
        collect_times, bare_times = [], []
        for r in range(args.repeats):
            for side in ("collect", "bare") if r % 2 == 0 else ("bare", "collect"):
                start = time.perf_counter()
                if side == "collect":
                    rows = run_collect(prompt_file, Path(tmp, f"out-{r}"), args.seeds, args.batch, args.steps)  # fmt: skip
                    collect_times.append(time.perf_counter() - start)
                else:
                    scored = bare_loop(
                        prompts, ids, list(range(args.seeds)), args.batch, args.steps
                    )
                    bare_times.append(time.perf_counter() - start)
    collect_s, bare_s = sum(collect_times) / args.repeats, sum(bare_times) / args.repeats
    assert rows == scored == len(prompts) * args.seeds
    ratio = bare_s / collect_s  # throughput of collect relative to the bare loop
    result = {
        "prompts": len(prompts), "seeds": args.seeds, "batch": args.batch, "steps": args.steps,
        "processes": 1, "threads": args.threads, "images": rows, "repeats": args.repeats,
        "collect_runs_s": [round(t, 2) for t in collect_times], "bare_runs_s": [round(t, 2) for t in bare_times],
        "collect_s": round(collect_s, 2), "bare_loop_s": round(bare_s, 2),
        "collect_images_per_s": round(rows / collect_s, 3),
        "bare_images_per_s": round(scored / bare_s, 3), "ratio": round(ratio, 3),
    }  # fmt: skip
    print(json.dumps(result))
    print(
        f"collect {result['collect_images_per_s']} images/s vs bare pipe+judge loop "
        f"{result['bare_images_per_s']} images/s ({rows} images, batch {args.batch}, {args.steps} steps): "
        f"ratio {ratio:.3f} ({'met' if ratio >= TARGET else 'NOT met'}; target >= {TARGET})"
    )


if __name__ == "__main__":
    main()
