"""Held-out alignment of a trained policy on the toy world: projected vs standard noise, same seeds.

    .venv/bin/python bench/toy_projector.py --projector outputs/toy/train_projector [--seeds 8]
    .venv/bin/python bench/toy_projector.py --policy outputs/toy/train_npnet      # any policy folder
    .venv/bin/python bench/toy_projector.py --projector src/noisealign/toy/assets/projector --residual_scale 1 2 3
    .venv/bin/python bench/toy_projector.py --projector ... --split seen --every 8 --first_seed 100 --seeds 4
    .venv/bin/python bench/toy_projector.py --projector ... --scheduler dpmsolver++ --num_inference_steps 10

``--policy`` and ``--projector`` are the same flag: any folder ``load_policy`` reads (noise
projector, NPNet, compatible NPNet). ``--residual_scale`` overrides a noise projector's
``residual_scale``; with several values the standard images are made once and each value
prints its own line.
``--projector A+B`` (noise projectors only) scores their *sum*: ε′ = moment_match(ε, s·(r_A + r_B)),
the residual of each folder before the moment match added up, with s the first folder's
``residual_scale`` (or each ``--residual_scale``); a two-member ensemble for experiments, which
the library does not ship (docs/projector.md, "The accepted-images pattern").
``--scheduler`` (a name of ``noisealign.pipelines.schedulers.SCHEDULERS``, default ddim) and
``--num_inference_steps`` choose the sampler both noises are denoised with.

For every prompt of ``--split`` (default ``heldout``: compositions never seen in training;
``seen``: the two-object training prompts, of which ``--every 8`` keeps 46) and seed
(``--first_seed`` on; the collect uses seeds 0-7, so seen prompts are scored on seeds it did
not use, e.g. 100-103), the standard noise is ``batch_noise(prompt_id, seed)`` — the toy
baseline's — and the projected noise is
f_θ of it; both are denoised with the same settings and scored by the ``shapes`` judge. Prints
one JSON line: mean alignment of each, per-image win/tie/loss, the mean per-prompt difference
with a 95% bootstrap interval over prompts (``evaluation.compare``), the accuracy of each
concept kind (object, attribute, count, relation) with its per-prompt difference and interval,
and ε′'s Gaussianity (per-sample mean, std, KS distance and the share passing
``GaussianStats.is_gaussian``).
"""

from __future__ import annotations

import argparse
import json
import time
import types

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from noisealign.evaluation import bootstrap_interval, compare, concept_accuracy
from noisealign.evaluation.metrics import CONCEPT_THRESHOLD
from noisealign.noise import batch_noise, gaussian_stats
from noisealign.pipelines import encode_prompts, generate
from noisealign.pipelines.schedulers import SCHEDULERS, set_scheduler
from noisealign.policies import POLICIES, NoiseProjector, load_policy, project
from noisealign.toy import pipeline_path
from noisealign.toy.grammar import prompt_records
from noisealign.toy.judge import ShapesJudge
from noisealign.toy.models import LATENT_SHAPE


def concept_rows(record: dict, seeds: list[int], feedback) -> list[dict]:
    """``evaluation.metrics`` rows of one prompt's images."""
    return [
        {"prompt_id": record["prompt_id"], "seed": seed, "overall": f.overall,
         "concepts": [{"kind": c.kind, "score": c.score} for c in f.concepts]}
        for seed, f in zip(seeds, feedback, strict=True)
    ]  # fmt: skip


def concept_differences(rows: list[dict], standard: list[dict]) -> dict[str, dict]:
    """Per concept kind: accuracy of each, and the mean per-prompt accuracy difference with its
    95% bootstrap interval over prompts (prompts without that kind are left out)."""

    def per_prompt(rs: list[dict]) -> dict[tuple[str, str], list[bool]]:
        hits: dict[tuple[str, str], list[bool]] = {}
        for r in rs:
            for c in r["concepts"]:
                hits.setdefault((c["kind"], r["prompt_id"]), []).append(
                    c["score"] >= CONCEPT_THRESHOLD
                )
        return hits

    ours, base = per_prompt(rows), per_prompt(standard)
    acc, base_acc = concept_accuracy(rows), concept_accuracy(standard)
    out = {}
    for kind in sorted({k for k, _ in ours}):
        diff = np.array([np.mean(ours[k]) - np.mean(base[k]) for k in ours if k[0] == kind])
        low, high = bootstrap_interval(diff)
        out[kind] = {"standard": base_acc[kind], "projected": acc[kind],
                     "difference": float(diff.mean()), "bootstrap95": [low, high]}  # fmt: skip
    return out


def load_sum(folders: str, pipe):
    """The policy of ``folders`` ('A' or 'A+B+…'): several noise projectors' residuals summed."""
    members = [load_policy(folder, pipe) for folder in folders.split("+")]
    if len(members) == 1:
        return members[0]
    if not all(isinstance(m, NoiseProjector) for m in members):
        raise SystemExit(f"--projector {folders}: only noise projectors can be summed")
    first, residuals = members[0], [type(m).residual.__get__(m) for m in members]
    first.residual = types.MethodType(
        lambda self, *args: sum(residual(*args) for residual in residuals), first
    )
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", "--projector", dest="projector", required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first_seed", type=int, default=0)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--every", type=int, default=1, help="score every N-th prompt of the split")
    parser.add_argument("--num_inference_steps", "--steps", dest="steps", type=int, default=20)
    parser.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument(
        "--residual_scale", type=float, nargs="+",
        help="override a projector's residual_scale; several values print one line each",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, args.scheduler)  # ddim: the pipeline's own scheduler, left as loaded
    projector = load_sum(args.projector, pipe)
    scales = args.residual_scale or [None]
    if args.residual_scale is not None and not hasattr(projector.config, "residual_scale"):
        parser.error(f"--residual_scale needs a noise projector; {args.projector} is not one")
    policy_type = next(name for name, cls in POLICIES.items() if type(projector) is cls)
    judge = ShapesJudge()
    records = prompt_records(args.split)[:: args.every]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    started = time.perf_counter()
    standard, base = [], []
    projected = {s: {"rows": [], "stats": []} for s in scales}
    for record in tqdm(records, desc=f"{args.split} prompts", unit="prompt"):
        prompts = [record["prompt"]] * len(seeds)
        emb = encode_prompts(pipe, prompts)
        noise = batch_noise([record["prompt_id"]] * len(seeds), seeds, LATENT_SHAPE)
        base.append(gaussian_stats(noise))
        runs = [(noise, standard)]
        for scale in scales:
            if scale is not None:
                projector.config.residual_scale = scale
            x = project(projector, noise, emb)
            projected[scale]["stats"].append(gaussian_stats(x))
            runs.append((x, projected[scale]["rows"]))
        for x, out in runs:
            images = generate(pipe, emb, x, num_inference_steps=args.steps, guidance_scale=args.guidance)  # fmt: skip
            out.extend(concept_rows(record, seeds, judge.score(images, prompts)))
    for scale in scales:
        rows, stats = projected[scale]["rows"], projected[scale]["stats"]
        std = np.array([r["overall"] for r in standard])
        proj = np.array([r["overall"] for r in rows])
        paired = compare(rows, standard)
        mean_, std_, ks = (torch.cat([getattr(s, k) for s in stats]) for k in ("mean", "std", "ks"))
        passed = torch.cat([s.is_gaussian() for s in stats]).float().mean().item()
        per_prompt = proj.reshape(len(records), -1).mean(1) - std.reshape(len(records), -1).mean(1)
        result = {
            "projector": args.projector, "policy_type": policy_type, "residual_scale": scale, "split": args.split, "prompts": len(records),
            "seeds": seeds, "scheduler": args.scheduler, "num_inference_steps": args.steps, "standard_mean": float(std.mean()), "projected_mean": float(proj.mean()),
            "difference": paired["difference"], "bootstrap95": paired["difference_ci95"],
            "wins": paired["wins"], "ties": paired["ties"], "losses": paired["losses"],
            "win_rate_decided": float((proj > std).sum() / max(1, (proj != std).sum())),
            "prompts_better": int((per_prompt > 0).sum()), "prompts_worse": int((per_prompt < 0).sum()),
            "concepts": concept_differences(rows, standard),
            "eps_prime_mean_abs_max": float(mean_.abs().max()), "eps_prime_std_range": [float(std_.min()), float(std_.max())],
            "eps_prime_ks_mean": float(ks.mean()), "eps_prime_ks_max": float(ks.max()), "gaussian_share": passed,
            "standard_gaussian_share": torch.cat([s.is_gaussian() for s in base]).float().mean().item(),
            "standard_ks_mean": float(torch.cat([s.ks for s in base]).mean()),
            "seconds": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        print(json.dumps(result))


if __name__ == "__main__":
    main()
