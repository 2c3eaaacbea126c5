"""What the judging stages (collect, collect_npd) share: their generation settings and the
opening of a sharded, resumable run over (prompt id, seed) keys.

Work is cut into chunks of ``chunk_size`` keys; process r takes chunks r, r+N, ...; each chunk
is written atomically as a shard, so a killed run restarted with the same command finishes with
every key exactly once (:mod:`noisealign.data.shards`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from noisealign import pipelines
from noisealign.configs import TORCH_DTYPES, DocumentedFields, arg, check_seeds
from noisealign.data.prompts import (
    PromptRecord,
    heldout_record,
    load_training_prompts,
    parse_seeds,
    save_heldout_record,
)
from noisealign.data.shards import ShardStore
from noisealign.judges import build_judge
from noisealign.outputs import check_output_dir_against_inputs
from noisealign.pipelines.schedulers import SCHEDULERS, check_recipe_fields, drop_default_sampler
from noisealign.tracking import make_accelerator, start_tracking

logger = logging.getLogger("noisealign.generation")
Key = tuple[str, int]


@dataclass
class GenerationSettings(DocumentedFields):
    """Recipe fields of the stages that generate images of prompts × seeds and judge them."""

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
    """Denoising steps per judged image."""
    guidance_scale: float = arg(5.0, min=0)
    """Classifier-free guidance scale of the judged images."""
    scheduler: str = arg("ddim", choices=tuple(SCHEDULERS))
    """Sampler of the judged images: ddim (the default), euler, dpmsolver++, lcm, or flow_euler
    (for flow-matching models), built from the pipeline's scheduler config. collect_npd's
    re-denoise step stays DDIM."""
    scheduler_kwargs: dict = arg({})
    """Extra arguments of the scheduler's class, e.g. {"use_karras_sigmas": true} (JSON on the
    command line); keys the class does not take are refused."""
    height: int | None = arg(None, min=8, multiple_of=8)
    """Image height in pixels; the pipeline's default when unset."""
    width: int | None = arg(None, min=8, multiple_of=8)
    """Image width in pixels; the pipeline's default when unset."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16 (stored noises are float32)."""
    chunk_size: int = arg(64, min=1)
    """Keys per shard. A kill loses at most one unfinished chunk per process."""
    judge_retries: int = arg(2, min=0)
    """Per-sample retries after a judge fails on a batch."""

    # the stage's own fields that decide a row's content, besides the generation settings
    row_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if isinstance(self.seeds, list):  # a YAML list arrives untouched by argparse
            self.seeds = ",".join(str(s) for s in self.seeds)
        super().__post_init__()  # BaseConfig's: types and the limits in each field's metadata
        check_recipe_fields(self.scheduler, self.scheduler_kwargs)

    def fingerprint(self) -> dict:
        """Settings that decide a row's content; a folder written with others is refused."""
        keys = ("pipeline", "judge", "judge_kwargs", "prompt_column", "num_inference_steps")
        keys += ("guidance_scale", "height", "width", "torch_dtype", *self.row_fields)
        keys += ("scheduler", "scheduler_kwargs")
        return drop_default_sampler({k: getattr(self, k) for k in keys})


@dataclass
class JudgedRun:
    """An opened run: its prompts and keys, the claimed folder, the models and the processes."""

    records: dict[str, PromptRecord]
    keys: list[Key]
    store: ShardStore
    accelerator: Any
    judge: Any
    pipe: Any
    shape: tuple[int, ...]


def open_run(config: Any, stage: str, inputs: dict[str, Any]) -> JudgedRun:
    """Prompts, folder checks, accelerator, judge, pipeline: every check before the folder is
    claimed (recipe.json) and before any tracker run starts."""
    # held-out prompts (split 'eval') never reach a training input; heldout.json records them
    records = {r.prompt_id: r for r in load_training_prompts(config.prompts, config.prompt_column)}
    keys = [(pid, seed) for pid in records for seed in parse_seeds(config.seeds)]
    store = ShardStore(config.output_dir, key_columns=("prompt_id", "seed"))
    check_output_dir_against_inputs(
        config.output_dir, inputs, stage=stage, overwrite=config.overwrite_output_dir
    )
    accelerator = make_accelerator(config)
    # after the Accelerator, so a judge's default device is this rank's; before the folder
    # is claimed, so an unknown judge or a bad judge_kwargs leaves no recipe.json behind
    judge = build_judge(config.judge, **config.judge_kwargs)
    # the pipeline loads before the folder is claimed: a mistyped path must not leave a
    # recipe.json that refuses the corrected recipe
    pipe = pipelines.load_pipeline(  # looked up at call time: tests spy on it
        config.pipeline,
        torch_dtype=config.torch_dtype,
        scheduler=config.scheduler,
        scheduler_kwargs=config.scheduler_kwargs,
        trust_remote_code=config.trust_remote_code,
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
    shape = pipelines.latent_shape(pipe, config.height, config.width)
    if accelerator.is_main_process:
        store.prepare(config.fingerprint(), overwrite=config.overwrite_output_dir)
        save_heldout_record(store.root, heldout_record(config.prompts, config.prompt_column))
    accelerator.wait_for_everyone()
    start_tracking(accelerator, config, stage)
    return JudgedRun(records, keys, store, accelerator, judge, pipe, shape)


def my_chunks(run: JudgedRun, chunk_size: int) -> list[list[Key]]:
    """Every process cuts the same chunks of the keys not yet done, then takes its share."""
    chunks = run.store.plan(run.keys, chunk_size)
    run.accelerator.wait_for_everyone()  # nobody writes before everyone has read the done keys
    rank, world = run.accelerator.process_index, run.accelerator.num_processes
    mine = chunks[rank::world]
    logger.info(
        "%d of %d keys to collect; process %d takes %d chunks",
        sum(map(len, chunks)),
        len(run.keys),
        rank,
        len(mine),
    )
    return mine
