"""The image_npd stage: golden-noise pairs from the collect stage's accepted images.

    noisealign image_npd --config recipes/toy/image_npd.yaml
    python -m noisealign.image_npd --config recipes/toy/image_npd.yaml

For every row of a collect dataset (``save_images: true``) whose judge score is at least
``min_score``, draws ``pairs_per_image`` fresh standard noises ε and writes NPD pairs
(:mod:`noisealign.data.npd`, the format ``train_npnet`` reads)

    source = ε,   target = √(1−γ)·ε + √γ·z,

z the image's VAE latent standardised per sample (:mod:`noisealign.data.image_latents`). The
target is a distribution-preserving mix, so it is as Gaussian per value as ε, and it carries
the layout of an image the judge accepted: generation from it follows that image (on the toy
world 82–90% of such rows come out right for γ ≥ 0.05, docs/collect.md). A policy regressed
onto these targets therefore learns to put an accepted layout for the prompt into the noise.
It is the counterpart of ``collect_npd``'s re-denoised targets (Golden Noise, Alg. 1) that needs
no extra generation: the judged images already exist. No image is generated here; the VAE
encodes each accepted image once.

Stored scores: ``target_score`` is the accepted image's judge score, ``source_score`` is NaN
(the image of ε itself was never generated) and every pair is ``kept``.

One process on accelerate's device (a GPU when there is one); launched with more it stops
with a ConfigError, since each would write the whole dataset.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from noisealign.configs import TORCH_DTYPES, BaseConfig, arg, parse_config
from noisealign.data.image_latents import ImageLatents
from noisealign.data.npd import npd_features
from noisealign.data.prompts import check_not_heldout, save_heldout_record
from noisealign.data.shards import claim_output_dir, replace_dataset
from noisealign.errors import ConfigError, DataError
from noisealign.noise import batch_noise, distribution_preserving_mix
from noisealign.outputs import check_output_dir_against_inputs
from noisealign.pipelines import load_pipeline, pipeline_signature
from noisealign.tracking import make_accelerator

logger = logging.getLogger("noisealign.image_npd")
# the collect columns an image pair reads or copies
NEEDED = (
    "prompt_id",
    "prompt",
    "seed",
    "overall",
    "failed",
    "latent_shape",
    "pipeline",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "judge",
)


@dataclass
class ImageNPDConfig(BaseConfig):
    """Recipe of the image_npd stage."""

    dataset: str = arg("", required=True)
    """A collect dataset folder (<output_dir>/dataset) collected with save_images: true. Required.
    """
    pipeline: str = arg("", required=True)
    """The pipeline the images were generated with; its VAE encodes them. Required."""
    gamma: float = arg(0.1, min=0, min_exclusive=True, max=1)
    """γ of the target mix √(1−γ)·ε + √γ·z: how strongly the accepted layout is put into the noise.
    """
    pairs_per_image: int = arg(8, min=1)
    """Fresh noises (pairs) per accepted image."""
    min_score: float = 1.0
    """Rows whose judge score is at least this are accepted images."""
    torch_dtype: str = arg("float32", choices=TORCH_DTYPES)
    """Pipeline dtype: float32, float16 or bfloat16 (noises are stored in float32)."""

    def fingerprint(self) -> dict:
        keys = ("dataset", "pipeline", "gamma", "pairs_per_image", "min_score", "seed")
        return {k: getattr(self, k) for k in keys}


CONFIG_CLASS = ImageNPDConfig  # read by `noisealign.cli` and the recipe tests


def accepted_rows(config: ImageNPDConfig, table: datasets.Dataset) -> tuple[Any, list[int], Any]:
    """The needed columns of the collect dataset, the indices of its accepted images and its
    held-out record (refused if it holds an evaluation prompt)."""
    missing = [c for c in NEEDED if c not in table.column_names]
    if missing:
        raise DataError(
            f"dataset '{config.dataset}' lacks the columns {', '.join(missing)}; point 'dataset' "
            "at a collect stage's <output_dir>/dataset"
        )
    meta = table.select_columns(list(NEEDED))
    heldout = check_not_heldout(config.dataset, meta["prompt_id"])  # evaluation prompts stay unseen
    accepted = [
        i
        for i, (score, failed) in enumerate(zip(meta["overall"], meta["failed"]))
        if not failed and not math.isnan(score) and score >= config.min_score
    ]
    if not accepted:
        raise DataError(
            f"no row of '{config.dataset}' has a judge score >= {config.min_score}; collect more "
            "seeds or lower 'min_score'"
        )
    return meta, accepted, heldout


def image_pairs(config, row: dict, z, signature: str) -> list[dict]:
    """The ``pairs_per_image`` NPD rows of one accepted image (collect row ``row``, latent z)."""
    k = config.pairs_per_image
    shape = tuple(row["latent_shape"])
    seeds = [(config.seed * 1_000_003 + row["seed"]) * k + j for j in range(k)]
    eps = batch_noise([f"{row['prompt_id']}\x1fimage_npd"] * k, seeds, shape)
    target = distribution_preserving_mix(eps, z.expand_as(eps), config.gamma)
    return [
        {
            "prompt_id": row["prompt_id"],
            "prompt": row["prompt"],
            "seed": seeds[j],
            "source_noise": eps[j].numpy(),
            "target_noise": target[j].numpy(),
            "source_score": float("nan"),
            "target_score": float(row["overall"]),
            "kept": True,
            "failed": False,
            "error": "",
            "judge": row["judge"],
            "margin": float("nan"),
            "pipeline": config.pipeline,
            "pipeline_signature": signature,
            "latent_shape": list(shape),
            "height": row["height"],
            "width": row["width"],
            "num_inference_steps": row["num_inference_steps"],
            "guidance_scale": row["guidance_scale"],
            "redenoise_steps": 0,
            "guidance_denoise": float("nan"),
            "guidance_invert": float("nan"),
        }
        for j in range(k)
    ]


def one_process(config: ImageNPDConfig):
    """The accelerator of the one process this stage runs in (N copies would each write the
    whole dataset)."""
    accelerator = make_accelerator(config)
    if accelerator.num_processes > 1:
        raise ConfigError(
            f"image_npd runs in one process (it writes one dataset), got "
            f"{accelerator.num_processes} processes; run it as 'noisealign image_npd' or launch "
            "it with --num_processes 1"
        )
    return accelerator


def main(args: Sequence[str] | None = None):
    """Run the image_npd stage; returns the written NPD dataset."""
    # ---- 1. recipe, one process, inputs that are not the output --------------------
    config = parse_config(ImageNPDConfig, args)
    accelerator = one_process(config)
    check_output_dir_against_inputs(
        config.output_dir,
        {"dataset": config.dataset, "pipeline": config.pipeline},
        stage="image_npd",
        overwrite=config.overwrite_output_dir,
    )

    # ---- 2. the pipeline (its VAE) and the accepted images --------------------------
    pipe = load_pipeline(
        config.pipeline, torch_dtype=config.torch_dtype, trust_remote_code=config.trust_remote_code
    )
    pipe.to(accelerator.device)
    logger.info(
        "process %d on %s: pipeline on %s",
        accelerator.process_index,
        accelerator.device,
        pipe.device,
    )
    source = ImageLatents(config.dataset, pipe)
    meta, accepted, heldout = accepted_rows(config, source.dataset)

    # ---- 3. claim the folder ------------------------------------------------------------
    out = Path(config.output_dir)
    claim_output_dir(
        out, config.fingerprint(), config.overwrite_output_dir, derived=[out / "dataset"]
    )
    if heldout is not None:  # passed on, so train_npnet can check the pairs too
        save_heldout_record(out, heldout)

    # ---- 4. pairs: fresh noises, each mixed with its image's latent ----------------------
    signature = json.dumps(pipeline_signature(pipe))
    rows = []
    for i in tqdm(accepted, desc="image_npd"):
        row = meta[i]
        z = source.latent(i, row["latent_shape"], cache=False)  # each image is used once
        rows += image_pairs(config, row, z, signature)

    # ---- 5. write the dataset -------------------------------------------------------------
    shape = tuple(meta[accepted[0]]["latent_shape"])
    dataset = replace_dataset(
        datasets.Dataset.from_list(rows, features=npd_features(shape)), out / "dataset"
    )
    logger.info(
        "%d pairs from %d accepted images of %d prompts (of %d rows) at %s",
        len(rows),
        len(accepted),
        len({r["prompt_id"] for r in rows}),
        len(source.dataset),
        out / "dataset",
    )
    return dataset


if __name__ == "__main__":
    from noisealign.cli import run_stage

    run_stage(main)
