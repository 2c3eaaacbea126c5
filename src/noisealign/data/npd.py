"""Noise prompt datasets (NPD): re-denoise noise pairs written by ``collect_npd``, read by
``train_npnet``.

One row per (prompt id, seed): the source noise x_T, the target noise x′_T =
DDIM-Inversion(DDIM(x_T))
(Golden Noise, arXiv 2411.09502, Alg. 1), the judge's score of the image generated from each,
whether the pair passed the filter s′ > s + m, and the settings that produced it. Every pair is
stored, kept or not, so a different margin can be tried without collecting again.

Example:
    >>> pairs = load_noise_pairs("outputs/toy/collect_npd/dataset")  # doctest: +SKIP
    >>> pairs.num_rows, pairs.latent_shape  # doctest: +SKIP
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
import numpy as np
import torch
from datasets import Array3D, Features, List, Value
from torch.utils.data import Dataset

from ..errors import DataError, PipelineError
from ..pipelines.signature import check_compatible

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = (
    "prompt_id",
    "prompt",
    "seed",
    "latent_shape",
    "pipeline_signature",
    "source_noise",
    "target_noise",
    "source_score",
    "target_score",
    "kept",
    "failed",
)


def npd_features(latent_shape: Sequence[int]) -> Features:
    """Features of an NPD: keys, both noises ``(C, H, W)`` float32, both scores, the filter, the
    settings."""
    noise = Array3D(shape=tuple(latent_shape), dtype="float32")
    return Features(
        {
            "prompt_id": Value("string"),
            "prompt": Value("string"),
            "seed": Value("int64"),
            "source_noise": noise,
            "target_noise": noise,
            "source_score": Value("float32"),
            "target_score": Value("float32"),
            "kept": Value("bool"),
            "failed": Value("bool"),
            "error": Value("string"),
            "judge": Value("string"),
            "margin": Value("float32"),
            "pipeline": Value("string"),
            "pipeline_signature": Value(
                "string"
            ),  # JSON of noisealign.pipelines.pipeline_signature
            "latent_shape": List(Value("int32")),
            "height": Value("int32"),
            "width": Value("int32"),
            "num_inference_steps": Value("int32"),
            "guidance_scale": Value("float32"),
            "redenoise_steps": Value("int32"),
            "guidance_denoise": Value("float32"),
            "guidance_invert": Value("float32"),
        }
    )


def keep_pair(source_score: float, target_score: float, margin: float) -> bool:
    """Alg. 1's filter 𝕀[s + m < s′]: the target noise's image beats the source's by more than
    ``margin``.

    A NaN score (failed judge) never keeps the pair.
    """
    if math.isnan(source_score) or math.isnan(target_score):
        return False
    return source_score + margin < target_score


@dataclass
class NoisePairs:
    """The usable pairs of an NPD (kept, judged, finite) and facts shared by all of them."""

    table: datasets.Dataset  # the usable rows only
    prompt_ids: list[str]
    prompts: list[str]
    latent_shape: tuple[int, int, int]
    pipeline_signature: dict[str, Any]
    skipped_not_kept: int
    skipped_nonfinite: list[int]  # row indices in the dataset on disk

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def open_npd(path: str | Path) -> datasets.Dataset:
    """A dataset written by collect_npd; :class:`DataError` naming what is missing otherwise.

    ``path`` is collect_npd's ``dataset/`` folder or its output folder.
    """
    path = Path(path)
    if (path / "dataset" / "dataset_info.json").is_file():
        path = path / "dataset"
    if not (path / "dataset_info.json").is_file():
        raise DataError(
            f"dataset '{path}' does not exist or was not saved with save_to_disk; run "
            "`noisealign collect_npd` and point 'dataset' to its output folder"
        )
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"dataset '{path}' has several splits; point 'dataset' to one split")
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"dataset '{path}' lacks the columns {', '.join(missing)} that train_npnet needs; "
            "collect noise pairs with `noisealign collect_npd`"
        )
    return dataset


def _finite_rows(dataset: datasets.Dataset, rows: Sequence[int], chunk: int = 256) -> np.ndarray:
    """(len(rows),) bool: both noises finite; read in chunks so large latents never all sit in
    memory."""
    table = dataset.select_columns(["source_noise", "target_noise"]).with_format("numpy")
    ok = []
    for start in range(0, len(rows), chunk):
        batch = table[list(rows[start : start + chunk])]
        both = [
            np.asarray(batch[c]).reshape(len(batch[c]), -1)
            for c in ("source_noise", "target_noise")
        ]
        ok.append(np.isfinite(both[0]).all(1) & np.isfinite(both[1]).all(1))
    return np.concatenate(ok) if ok else np.zeros(0, dtype=bool)


def load_noise_pairs(path: str | Path, margin: float | None = None) -> NoisePairs:
    """The kept pairs of an NPD; NaN/Inf rows are reported and skipped.

    Args:
        path: collect_npd's output folder or its ``dataset/``.
        margin: re-filter every judged pair with this m instead of using the ``kept`` column.

    Raises:
        DataError: missing columns, no usable pair, or pairs of several latent shapes / pipelines.
    """
    dataset = open_npd(path)
    meta = dataset.select_columns(["failed", "kept", "source_score", "target_score"])
    if margin is None:
        keep = [k and not f for k, f in zip(meta["kept"], meta["failed"])]
    else:
        keep = [
            not f and keep_pair(s, t, margin)
            for f, s, t in zip(meta["failed"], meta["source_score"], meta["target_score"])
        ]
    rows = [i for i, k in enumerate(keep) if k]
    finite = _finite_rows(dataset, rows)
    bad = [r for r, ok in zip(rows, finite) if not ok]
    if bad:
        logger.warning("skipped %d pairs with NaN/Inf noise: rows %s", len(bad), bad[:20])
    usable = [r for r, ok in zip(rows, finite) if ok]
    if not usable:
        raise DataError(
            f"dataset '{path}' has no usable pair ({dataset.num_rows} rows, {len(rows)} kept, "
            f"{len(bad)} with NaN/Inf noise); collect more prompts or seeds, or lower the margin"
        )
    table = dataset.select(usable)
    shapes = {tuple(s) for s in table["latent_shape"]}
    signatures = set(table["pipeline_signature"])
    if len(shapes) > 1 or len(signatures) > 1:
        raise DataError(
            f"dataset '{path}' mixes latent shapes {sorted(shapes)} or pipelines; train on pairs "
            "of one collect_npd recipe"
        )
    return NoisePairs(
        table=table,
        prompt_ids=table["prompt_id"],
        prompts=table["prompt"],
        latent_shape=tuple(int(v) for v in shapes.pop()),
        pipeline_signature=json.loads(signatures.pop()),
        skipped_not_kept=dataset.num_rows - len(rows),
        skipped_nonfinite=bad,
    )


def check_pairs_fit_pipeline(pairs: NoisePairs, signature: dict[str, Any], where: str) -> None:
    """:class:`PipelineError` when the pairs were collected with a pipeline whose embeddings or
    latents differ.

    The latent *size* may differ from the pipeline's default (a policy for any size), the
    channels, text encoder and tokenizer may not.
    """
    recorded = {k: v for k, v in pairs.pipeline_signature.items() if k != "default_latent_size"}
    current = {k: v for k, v in signature.items() if k != "default_latent_size"}
    check_compatible(recorded, current, f"the noise pairs of '{where}'")
    if pairs.latent_shape[0] != signature["latent_channels"]:
        raise PipelineError(
            f"the noise pairs of '{where}' have {pairs.latent_shape[0]} latent channels but the "
            f"pipeline's latents have {signature['latent_channels']}; train with the pipeline they "
            "were collected with"
        )


class NoisePairDataset(Dataset):
    """Rows ``indices`` of :class:`NoisePairs` as batches: source, target ``(B, C, H, W)``, row
    index ``(B,)``.

    ``__getitems__`` reads a whole batch from the Arrow table at once (the loader's collate_fn
    must pass it through); the noise never has to fit in memory as a whole.
    """

    def __init__(self, pairs: NoisePairs, indices: Sequence[int]) -> None:
        self.indices = list(indices)
        self.table = pairs.table.select_columns(["source_noise", "target_noise"]).with_format(
            "torch"
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [self.indices[i] for i in items]
        batch = self.table[rows]
        return {
            "source": batch["source_noise"].float(),
            "target": batch["target_noise"].float(),
            "row": torch.tensor(rows, dtype=torch.long),
        }

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([item]).items()}


def pass_through(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """collate_fn for :class:`NoisePairDataset`: ``__getitems__`` already stacked the batch."""
    return batch
