"""evaluate stage: every method on the same prompts and seeds, one table, one grid, one cost plot.

Launch (any of):
    noisealign evaluate --config recipes/toy/evaluate.yaml
    python -m noisealign.evaluate --config recipes/toy/evaluate.yaml --seeds 0:2

Methods (``standard``, trained ``policy`` folders, ``best_of_n``, ``early_stop``,
``noise_diffusion``; see :mod:`noisealign.evaluation.methods`) all start from the standard
noise ``batch_noise(prompt_id, seed)``. The final images are scored by every judge in
``judges`` (the first gives the alignment columns). Writes ``report.md``, ``report.json``,
``grid_<set>.png`` and ``cost_<set>.png`` to ``output_dir`` and logs them to wandb. Finished
methods are kept in ``rows/`` and skipped when the same recipe runs again.

With N processes (``accelerate launch --num_processes N src/noisealign/evaluate.py ...``) each
runs a share of the batches one process would run, and the main process merges them into the
same report (see :mod:`noisealign.evaluation.runner`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, check_seeds, parse_config
from noisealign.errors import ConfigError

logger = logging.getLogger("noisealign.evaluate")

# fields that do not change any number in the report
_NOT_FINGERPRINTED = (
    "output_dir",
    "overwrite_output_dir",
    "report_to",
    "wandb_project",
    "run_name",
    "num_threads",
    "batch_size",
    "device",
)


@dataclass
class EvaluateConfig(BaseConfig):
    """Recipe of the evaluate stage."""

    pipeline: str = arg("", required=True)
    """Diffusers pipeline folder or hub id. Required."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16."""
    device: str | None = None
    """torch device of the pipeline, policies and judges' inputs; unset: accelerate's device of each
    process. With several processes only a type without index ('cuda') is accepted."""
    prompt_sets: dict = arg({}, required=True)
    """Prompt sets to evaluate: name -> prompt file (.txt, .jsonl with optional concepts, GenEval
    metadata .jsonl, DrawBench-style .csv). Required."""
    prompt_split: str | None = None
    """Keep only rows whose 'split' column equals this. Unset: the held-out rows (split 'eval') of a
    file with a 'split' column, every row of a file without one."""
    prompt_column: str = "prompt"
    """Column holding the prompt in JSONL/CSV files (DrawBench: 'Prompts')."""
    max_prompts: int | None = arg(None, min=1)
    """Use only the first N prompts of each set (quick runs)."""
    seeds: str = arg("0:4", check=check_seeds)
    """Seeds per prompt: 'start:stop', 'a,b,c', or a YAML list of ints."""
    judges: list[str] = arg([], required=True)
    """Evaluation judges by name; the first gives the alignment columns. Prefer a judge other than
    the training judge. Required."""
    judge_kwargs: dict = arg({})
    """Judge name -> factory arguments (JSON on the command line)."""
    methods: dict = arg({}, required=True)
    """Label -> {type: standard|policy|best_of_n|early_stop|noise_diffusion, ...settings}. Must
    include a 'standard' entry."""
    num_inference_steps: int = arg(20, min=1)
    """Denoising steps per image, for every method."""
    guidance_scale: float = arg(5.0, min=0)
    """Classifier-free guidance scale, for every method."""
    batch_size: int = arg(16, min=1)
    """(prompt, seed) pairs per method call."""
    grid_prompts: int = arg(6, min=1)
    """Rows of the image grid: the first N prompts of each set, at the first seed."""

    def __post_init__(self) -> None:
        super().__post_init__()  # types and the limits in each field's metadata
        for label, settings in self.methods.items():
            if not isinstance(settings, dict) or "type" not in settings:
                raise ConfigError(
                    f"methods.{label} must be a mapping with a 'type', e.g. {{type: standard}}"
                )
        if not any(s["type"] == "standard" for s in self.methods.values()):
            raise ConfigError(
                "methods needs a 'standard' entry ({type: standard}): win rates are measured against it"
            )


CONFIG_CLASS = EvaluateConfig


def main(args: Sequence[str] | None = None) -> dict | None:
    """Run the evaluation and write the report; returns the report dict (as in report.json) on
    the main process, ``None`` on the others."""
    config = parse_config(EvaluateConfig, args)
    from noisealign.data.prompts import load_heldout_prompts, load_prompts, parse_seeds
    from noisealign.data.shards import claim_output_dir
    from noisealign.evaluation import runner
    from noisealign.evaluation.methods import EvalContext, build_method
    from noisealign.evaluation.report import write_report
    from noisealign.outputs import check_output_dir_against_inputs
    from noisealign.pipelines import latent_shape, load_pipeline
    from noisealign.tracking import make_accelerator, start_tracking

    accelerator = make_accelerator(config)
    device = runner.process_device(config.device, accelerator, "device")
    judge_kwargs = runner.judge_devices(config.judge_kwargs, accelerator)

    # ---- 1. prompts and seeds (checked before any model loads) ---------------------------
    seeds = parse_seeds(config.seeds)
    prompt_sets = {
        name: (
            load_heldout_prompts(path, config.prompt_column)
            if config.prompt_split is None
            else load_prompts(path, config.prompt_column, config.prompt_split)
        )[: config.max_prompts]
        for name, path in config.prompt_sets.items()
    }

    policies = {f"methods.{label}.policy": s.get("policy") for label, s in config.methods.items()}
    check_output_dir_against_inputs(
        config.output_dir,
        {"pipeline": config.pipeline, **policies},
        stage="evaluate",
        overwrite=config.overwrite_output_dir,
    )

    # ---- 2. pipeline, judges, methods (policies load and are checked against the pipe) --
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    ctx = EvalContext(
        pipe,
        tuple(latent_shape(pipe)),
        config.num_inference_steps,
        config.guidance_scale,
        default_judge=config.judges[0],
        judge_kwargs=judge_kwargs,
    )
    judges = {name: ctx.judge(name) for name in config.judges}
    runs = {label: build_method(label, s, ctx) for label, s in config.methods.items()}
    # only a recipe that passed every check claims the folder
    out = Path(config.output_dir)
    fingerprint = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    if accelerator.is_main_process:
        claim_output_dir(out, fingerprint, config.overwrite_output_dir, derived=[out / "rows"])
    accelerator.wait_for_everyone()  # nobody reads rows/ before an overwrite has cleared it
    start_tracking(accelerator, config, "evaluate")

    # ---- 3. this process's share of the unfinished methods' batches ---------------------
    work = runner.plan_work(
        out / "rows",
        prompt_sets,
        seeds,
        list(runs),
        batch_size=config.batch_size,
        grid_prompts=config.grid_prompts,
    )
    runner.run_share(
        work,
        runs,
        judges,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        device=device,
    )
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.end_training()
        return None
    report = {
        "pipeline": config.pipeline,
        "judges": list(config.judges),
        "seeds": seeds,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "device": str(pipe._execution_device),
        "num_processes": accelerator.num_processes,
        "prompt_sets": {},
    }
    samples = {}  # per prompt set: the grid's prompts, images and scores, for the tracker
    merged = runner.merged_results(out / "rows", work, list(prompt_sets), list(runs))
    for set_name, records in prompt_sets.items():
        results = merged[set_name]
        summary = report["prompt_sets"][set_name] = _summarise(config, records, seeds, results)
        samples[set_name] = _write_figures(
            out,
            set_name,
            config,
            records[: config.grid_prompts],
            seeds[0],
            results,
            summary["methods"],
        )

    # ---- 4. report.md / report.json, tracker ------------------------------------------
    path = write_report(out, report)
    _log_to_tracker(accelerator, out, report, samples)
    accelerator.end_training()
    logger.info("report written to %s\n%s", path, path.read_text())
    return report


def _summarise(config: EvaluateConfig, records, seeds, results: dict) -> dict:
    """Metrics of every method on one prompt set, in the recipe's method order."""
    from noisealign.evaluation.metrics import alignment, compare, concept_accuracy

    primary = config.judges[0]
    standard = next(lab for lab, s in config.methods.items() if s["type"] == "standard")

    def flat(rows: list[dict], judge: str) -> list[dict]:
        return [
            {**r, "overall": r["scores"][judge], "concepts": r["concepts"][judge]} for r in rows
        ]

    base = flat(results[standard][0], primary)
    methods, others = [], {j: {} for j in config.judges[1:]}
    for label, (rows, cost, _grid) in results.items():
        rows1 = flat(rows, primary)
        methods.append(
            {
                "name": label,
                "type": config.methods[label]["type"],
                "settings": config.methods[label],
                "alignment": alignment(rows1),
                "concept_accuracy": concept_accuracy(rows1),
                **compare(rows1, base, seed=config.seed),
                **cost,
                "images": len(rows),
            }
        )
        for judge in others:
            others[judge][label] = alignment(flat(rows, judge))
    summary = {"prompts": len(records), "methods": methods}
    if others:
        summary["other_judges"] = others
    return summary


def _write_figures(
    out: Path, set_name: str, config, records, seed: int, results: dict, methods: list[dict]
) -> dict:
    """grid_<set>.png and cost_<set>.png; returns the grid's prompts, images and scores."""
    from noisealign.evaluation.report import cost_plot, image_grid

    primary = config.judges[0]
    columns, scores = {}, {}
    for label, (rows, _cost, grid) in results.items():
        by_key = {(r["prompt_id"], r["seed"]): r["scores"][primary] for r in rows}
        columns[label] = [grid[(r.prompt_id, seed)] for r in records]
        scores[label] = [by_key[(r.prompt_id, seed)] for r in records]
    prompts = [r.prompt for r in records]
    image_grid(columns, prompts, scores).save(out / f"grid_{set_name}.png")
    cost_plot(methods, out / f"cost_{set_name}.png", f"{set_name}: alignment vs cost ({primary})")
    return {"prompts": prompts, "seed": seed, "images": columns, "scores": scores}


def _log_to_tracker(accelerator, out: Path, report: dict, samples: dict) -> None:
    """The metrics table, a table of the grid's images (a row per prompt, a column per method), figures."""
    if not accelerator.trackers:
        return
    import wandb

    tracker = accelerator.get_tracker("wandb", unwrap=True)
    for set_name, result in report["prompt_sets"].items():
        columns = [
            "method",
            "alignment",
            "difference",
            "win_rate",
            "denoising_steps",
            "judge_calls",
            "seconds_per_image",
            "peak_memory_mb",
        ]
        table = wandb.Table(columns=columns)
        for m in result["methods"]:
            table.add_data(*(m[c] if c != "method" else m["name"] for c in columns))
        grid = samples[set_name]
        images = wandb.Table(columns=["prompt", "seed", *grid["images"]])
        for i, prompt in enumerate(grid["prompts"]):
            cells = [
                wandb.Image(grid["images"][m][i], caption=f"{grid['scores'][m][i]:.2f}")
                for m in grid["images"]
            ]
            images.add_data(prompt, grid["seed"], *cells)
        tracker.log(
            {
                f"{set_name}/table": table,
                f"{set_name}/samples": images,
                f"{set_name}/grid": wandb.Image(str(out / f"grid_{set_name}.png")),
                f"{set_name}/alignment_vs_cost": wandb.Image(str(out / f"cost_{set_name}.png")),
                **{f"{set_name}/{m['name']}/alignment": m["alignment"] for m in result["methods"]},
            }
        )


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
