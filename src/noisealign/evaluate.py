"""evaluate stage: every method on the same prompts and seeds; one table, grid and cost plot.

Launch (any of):
    noisealign evaluate --config recipes/toy/evaluate.yaml
    python -m noisealign.evaluate --config recipes/toy/evaluate.yaml --seeds 0:2

Methods (``standard``, trained ``policy`` folders, ``best_of_n``, ``early_stop``,
``noise_diffusion``; see :mod:`noisealign.evaluation.methods`) all start from the standard
noise ``batch_noise(prompt_id, seed)``. The final images are scored by every judge in
``judges`` (the first gives the alignment columns); ``scheduler`` picks the sampler of every
method's final images (:mod:`noisealign.pipelines.schedulers`). Writes ``report.md``,
``report.json``, ``grid_<set>.png`` and ``cost_<set>.png`` to ``output_dir`` and logs them to
wandb. Finished methods are kept in ``rows/`` and skipped when the same recipe runs again.

With N processes (``accelerate launch --num_processes N src/noisealign/evaluate.py ...``) each
runs a share of the batches one process would run, and the main process merges them into the
same report (see :mod:`noisealign.evaluation.runner`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline

from noisealign.cli import run_stage
from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, check_seeds, parse_config
from noisealign.data.prompts import PromptRecord, load_heldout_prompts, load_prompts, parse_seeds
from noisealign.data.shards import claim_output_dir
from noisealign.errors import ConfigError
from noisealign.evaluation import runner
from noisealign.evaluation.methods import EvalContext, Run, build_method, check_sampler
from noisealign.evaluation.report import log_to_tracker, summarise, write_figures, write_report
from noisealign.judges import Judge
from noisealign.outputs import check_output_dir_against_inputs
from noisealign.pipelines import SCHEDULERS, latent_shape, load_pipeline
from noisealign.pipelines.inputs import drop_default_size
from noisealign.pipelines.schedulers import check_recipe_fields, drop_default_sampler
from noisealign.tracking import make_accelerator, start_tracking

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
    """torch device of the pipeline, policies and judges' inputs; unset: accelerate's device of
    each process. With several processes only a type without index ('cuda') is accepted."""
    prompt_sets: dict = arg({}, required=True)
    """Prompt sets to evaluate: name -> prompt file (.txt, .jsonl with optional concepts, GenEval
    metadata .jsonl, DrawBench-style .csv). Required."""
    prompt_split: str | None = None
    """Keep only rows whose 'split' column equals this. Unset: the held-out rows (split 'eval') of
    a file with a 'split' column, every row of a file without one."""
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
    scheduler: str = arg("ddim", choices=tuple(SCHEDULERS))
    """Sampler of every method's final images (ddim, euler, dpmsolver++, lcm, flow_euler), built
    from the pipeline's scheduler config; early_stop and noise_diffusion need ddim (SD, SDXL) or
    flow_euler (SD3, FLUX)."""
    scheduler_kwargs: dict = arg({})
    """Extra arguments of the scheduler's class, e.g. {"use_karras_sigmas": true} (JSON on the
    command line); keys the class does not take are refused."""
    height: int | None = arg(None, min=8, multiple_of=8)
    """Image height in pixels, for every method; the pipeline's default when unset."""
    width: int | None = arg(None, min=8, multiple_of=8)
    """Image width in pixels, for every method; the pipeline's default when unset."""
    batch_size: int = arg(16, min=1)
    """(prompt, seed) pairs per method call."""
    grid_prompts: int = arg(6, min=1)
    """Rows of the image grid: the first N prompts of each set, at the first seed."""

    def __post_init__(self) -> None:
        super().__post_init__()  # types and the limits in each field's metadata
        check_recipe_fields(self.scheduler, self.scheduler_kwargs)
        for label, settings in self.methods.items():
            if not isinstance(settings, dict) or "type" not in settings:
                raise ConfigError(
                    f"methods.{label} must be a mapping with a 'type', e.g. {{type: standard}}"
                )
            check_sampler(label, settings["type"], self.scheduler)
        if not any(s["type"] == "standard" for s in self.methods.values()):
            raise ConfigError(
                "methods needs a 'standard' entry ({type: standard}): "
                "win rates are measured against it"
            )


CONFIG_CLASS = EvaluateConfig  # read by `noisealign.cli` and the recipe tests


def main(args: Sequence[str] | None = None) -> dict | None:
    """Run the evaluation and write the report; returns the report dict (as in report.json) on
    the main process, ``None`` on the others."""
    config = parse_config(EvaluateConfig, args)

    # ---- the processes and their devices
    accelerator = make_accelerator(config)
    device = runner.process_device(config.device, accelerator, "device")
    judge_kwargs = runner.judge_devices(config.judge_kwargs, accelerator)

    # ---- prompts, seeds and the output folder, checked before any model loads
    seeds = parse_seeds(config.seeds)
    prompt_sets = _load_prompt_sets(config)
    policies = {f"methods.{label}.policy": s.get("policy") for label, s in config.methods.items()}
    check_output_dir_against_inputs(
        config.output_dir,
        {"pipeline": config.pipeline, **policies},
        stage="evaluate",
        overwrite=config.overwrite_output_dir,
    )

    # ---- load the pipeline, the judges and the methods (policies are checked against the pipe)
    pipe = _load_pipeline(config, device)
    judges, runs = _build_methods(config, pipe, judge_kwargs)

    # ---- claim the output folder: only a recipe that passed every check does
    out = Path(config.output_dir)
    _claim_output_dir(config, accelerator, out)
    start_tracking(accelerator, config, "evaluate")

    # ---- this process's share of the unfinished methods' batches
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

    # ---- merge the shares: the report, the figures, the tracker
    report, samples = _report(config, out, work, prompt_sets, seeds, pipe, accelerator)
    path = write_report(out, report)
    log_to_tracker(accelerator, out, report, samples)
    accelerator.end_training()
    logger.info("report written to %s\n%s", path, path.read_text())
    return report


def _load_prompt_sets(config: EvaluateConfig) -> dict[str, list[PromptRecord]]:
    """Each prompt set's records: the held-out rows, or those of ``prompt_split``."""
    return {
        name: (
            load_heldout_prompts(path, config.prompt_column)
            if config.prompt_split is None
            else load_prompts(path, config.prompt_column, config.prompt_split)
        )[: config.max_prompts]
        for name, path in config.prompt_sets.items()
    }


def _load_pipeline(config: EvaluateConfig, device: torch.device) -> DiffusionPipeline:
    pipe = load_pipeline(
        config.pipeline,
        torch_dtype=config.torch_dtype,
        scheduler=config.scheduler,
        scheduler_kwargs=config.scheduler_kwargs,
        trust_remote_code=config.trust_remote_code,
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_methods(
    config: EvaluateConfig, pipe: DiffusionPipeline, judge_kwargs: dict
) -> tuple[dict[str, Judge], dict[str, Run]]:
    """The evaluation judges by name and each method's run by label, in recipe order."""
    ctx = EvalContext(
        pipe,
        tuple(latent_shape(pipe, config.height, config.width)),
        config.num_inference_steps,
        config.guidance_scale,
        default_judge=config.judges[0],
        judge_kwargs=judge_kwargs,
    )
    judges = {name: ctx.judge(name) for name in config.judges}
    runs = {label: build_method(label, s, ctx) for label, s in config.methods.items()}
    return judges, runs


def _claim_output_dir(config: EvaluateConfig, accelerator: Accelerator, out: Path) -> None:
    """The main process claims ``out`` for this recipe's fingerprint; the others wait for it."""
    fingerprint = {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED}
    fingerprint = drop_default_size(drop_default_sampler(fingerprint))
    if accelerator.is_main_process:
        claim_output_dir(out, fingerprint, config.overwrite_output_dir, derived=[out / "rows"])
    accelerator.wait_for_everyone()  # nobody reads rows/ before an overwrite has cleared it


def _report(
    config: EvaluateConfig,
    out: Path,
    work: list[runner.MethodWork],
    prompt_sets: dict[str, list[PromptRecord]],
    seeds: list[int],
    pipe: DiffusionPipeline,
    accelerator: Accelerator,
) -> tuple[dict, dict]:
    """Main process: every process's rows merged into the report dict, and each prompt set's
    figures written; returns the report and, per prompt set, the grid's samples for the tracker."""
    report = {
        "pipeline": config.pipeline,
        "judges": list(config.judges),
        "seeds": seeds,
        "num_inference_steps": config.num_inference_steps,
        "scheduler": config.scheduler,
        "scheduler_kwargs": config.scheduler_kwargs,
        "guidance_scale": config.guidance_scale,
        "device": str(pipe._execution_device),
        "num_processes": accelerator.num_processes,
        "prompt_sets": {},
    }
    samples = {}  # per prompt set: the grid's prompts, images and scores, for the tracker
    merged = runner.merged_results(out / "rows", work, list(prompt_sets), list(config.methods))
    for set_name, records in prompt_sets.items():
        results = merged[set_name]
        summary = report["prompt_sets"][set_name] = summarise(config, records, results)
        samples[set_name] = write_figures(
            out,
            set_name,
            config,
            records[: config.grid_prompts],
            seeds[0],
            results,
            summary["methods"],
        )
    return report, samples


if __name__ == "__main__":
    run_stage(main)
