"""Reading collected feedback rows for the distill stage: validation, cleaning, prompt split,
batching.

Rows come from the collect stage (:mod:`noisealign.data.schema`). Failed judge rows and rows
with NaN/Inf in their scores or stored noise are skipped and counted, never silently used.
The held-out split is by *prompt*, so no prompt is in both train and eval, and every batch
holds all seeds of a few prompts, which is what the pairwise ranking term compares.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import DataError
from ..noise import batch_noise

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = (
    "prompt_id",
    "prompt",
    "seed",
    "pipeline",
    "num_inference_steps",
    "guidance_scale",
    "latent_shape",
    "judge",
    "overall",
    "tokens",
    "token_scores",
    "token_mask",
    "failed",
)


@dataclass
class FeedbackRows:
    """The usable rows of a collected dataset, as tensors; N rows, L tokens."""

    prompt_ids: list[str]
    prompts: list[str]
    seeds: list[int]
    tokens: list[list[str]]
    overall: torch.Tensor  # (N,) float32 judge overall score in [0, 1]
    token_targets: torch.Tensor  # (N, L) float32 soft token scores
    token_mask: torch.Tensor  # (N, L) bool: tokens the judge scored
    noise: torch.Tensor | None  # (N, C, H, W) when the dataset stores it
    latent_shape: tuple[int, ...]
    judges: list[str]
    pipelines: list[str]
    num_inference_steps: int
    guidance_scale: float
    skipped_failed: int
    skipped_nonfinite: list[int]  # indices in the dataset

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: Sequence[int]) -> FeedbackRows:
        """The rows ``indices`` (in that order); the dataset-wide facts are kept."""
        idx = list(indices)

        def pick(values: list) -> list:
            return [values[i] for i in idx]

        return replace(
            self,
            prompt_ids=pick(self.prompt_ids),
            prompts=pick(self.prompts),
            seeds=pick(self.seeds),
            tokens=pick(self.tokens),
            overall=self.overall[idx],
            token_targets=self.token_targets[idx],
            token_mask=self.token_mask[idx],
            noise=None if self.noise is None else self.noise[idx],
        )


def load_feedback(path: str | Path) -> datasets.Dataset:
    """Open a collected dataset; :class:`DataError` if missing or lacking the distill columns."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(
            f"dataset '{path}' does not exist; run the collect stage and point 'dataset' to its "
            "dataset/ folder"
        )
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"'{path}' is not a dataset saved with save_to_disk ({exc})") from exc
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(
            f"dataset '{path}' has several splits; point 'dataset' to one split's folder"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"dataset '{path}' lacks the columns {', '.join(missing)} that distill needs; "
            "collect it with `noisealign collect`"
        )
    return dataset


def _single(values: Sequence, column: str) -> object:
    distinct = sorted(set(map(str, values)))
    if len(distinct) > 1:
        raise DataError(
            f"dataset mixes several values of '{column}' ({', '.join(distinct[:4])}); "
            "distill one collect recipe at a time"
        )
    return values[0]


def clean_feedback(dataset: datasets.Dataset) -> FeedbackRows:
    """Drop failed and non-finite rows (logged with their indices) and return the rest as
    tensors."""
    table = dataset.with_format("numpy")
    overall = np.asarray(table["overall"], dtype=np.float64)
    failed = np.asarray(table["failed"], dtype=bool) | np.isnan(overall)
    lengths = {len(t) for t in dataset["token_scores"]}
    if len(lengths) != 1:
        raise DataError(
            f"rows have token lists of different lengths {sorted(lengths)}; collect again"
        )
    scores = np.stack(list(table["token_scores"])).astype(np.float64)
    mask = np.stack(list(table["token_mask"])).astype(bool)
    nonfinite = ~failed & (~np.isfinite(overall) | ~np.isfinite(np.where(mask, scores, 0)).all(1))
    noise = None
    if "noise" in dataset.column_names:
        noise = np.asarray(table["noise"], dtype=np.float32)
        nonfinite |= ~failed & ~np.isfinite(noise.reshape(len(noise), -1)).all(1)
    bad = np.flatnonzero(nonfinite).tolist()
    if bad:
        logger.warning(
            "skipped %d rows with NaN/Inf in scores or noise: rows %s", len(bad), bad[:20]
        )
    if failed.any():
        logger.warning("skipped %d failed judge rows", int(failed.sum()))
    keep = np.flatnonzero(~failed & ~nonfinite)
    if len(keep) == 0:
        raise DataError("no usable rows: every row failed or holds NaN/Inf; collect again")
    kept = dataset.select(keep.tolist())

    def column(name: str) -> list:
        return kept[name]

    return FeedbackRows(
        prompt_ids=column("prompt_id"),
        prompts=column("prompt"),
        seeds=[int(s) for s in column("seed")],
        tokens=column("tokens"),
        overall=torch.tensor(overall[keep], dtype=torch.float32),
        token_targets=torch.tensor(scores[keep], dtype=torch.float32),
        token_mask=torch.tensor(mask[keep]),
        noise=None if noise is None else torch.from_numpy(noise[keep]),
        latent_shape=tuple(int(v) for v in _single(column("latent_shape"), "latent_shape")),
        judges=sorted(set(column("judge"))),
        pipelines=sorted(set(column("pipeline"))),
        num_inference_steps=int(_single(column("num_inference_steps"), "num_inference_steps")),
        guidance_scale=float(_single(column("guidance_scale"), "guidance_scale")),
        skipped_failed=int(failed.sum()),
        skipped_nonfinite=bad,
    )


def split_by_prompt(
    prompt_ids: Sequence[str], eval_fraction: float, min_eval_prompts: int, seed: int
) -> tuple[list[str], list[str]]:
    """``(train, eval)`` prompt ids, disjoint, eval a seeded random ``eval_fraction`` of the
    prompts."""
    unique = sorted(set(prompt_ids))
    n_eval = max(min_eval_prompts, round(eval_fraction * len(unique)))
    if len(unique) - n_eval < 1:
        raise DataError(
            f"the dataset has {len(unique)} usable prompts, too few for {n_eval} held-out prompts "
            "and "
            "at least one training prompt; collect more prompts or lower "
            "eval_fraction/min_eval_prompts"
        )
    random.Random(seed).shuffle(unique)
    return sorted(unique[n_eval:]), sorted(unique[:n_eval])


class FeedbackDataset(Dataset):
    """Rows ``indices`` of :class:`FeedbackRows` as dicts of tensors.

    ``prompt`` is the row's index into the prompt table (``prompt_order``), where the trainer
    keeps the embeddings; ``inputs`` is the noise (re-derived from the seed unless stored) or
    the precomputed k-step features (N, C, H, W).
    """

    def __init__(
        self,
        rows: FeedbackRows,
        indices: Sequence[int],
        prompt_order: Sequence[str],
        inputs: torch.Tensor | None = None,
    ) -> None:
        self.rows, self.indices = rows, list(indices)
        self.inputs = rows.noise if inputs is None else inputs
        position = {pid: i for i, pid in enumerate(prompt_order)}
        self.prompt = [position[rows.prompt_ids[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        i = self.indices[item]
        if self.inputs is None:
            x = batch_noise(
                [self.rows.prompt_ids[i]], [self.rows.seeds[i]], self.rows.latent_shape
            )[0]
        else:
            x = self.inputs[i]
        return {
            "inputs": x,
            "prompt": torch.tensor(self.prompt[item]),
            "token_targets": self.rows.token_targets[i],
            "token_mask": self.rows.token_mask[i],
            "overall": self.rows.overall[i],
        }


class PromptBatchSampler(Sampler[list[int]]):
    """Batches of ``prompts_per_batch`` prompt groups, reshuffled per epoch.

    A group is all seeds of one prompt, or, with ``seeds_per_group`` > 0, at most that many of
    them (a prompt with 150 teacher-labelled seeds gives 19 groups of 8, reshuffled each
    epoch), so batch size stays bounded while every batch still holds seed pairs to rank.
    The order depends only on ``(seed, epoch)``, so a resumed run replays the same batches.
    The method is deliberately not called ``set_epoch``: accelerate's prepared loaders call
    that with their own iteration count, which restarts at 0 after a resume.
    """

    def __init__(
        self,
        groups: Sequence[int],
        prompts_per_batch: int,
        shuffle: bool,
        seed: int = 0,
        seeds_per_group: int = 0,
    ) -> None:
        self.members: dict[int, list[int]] = {}
        for position, group in enumerate(groups):
            self.members.setdefault(int(group), []).append(position)
        self.keys = sorted(self.members)
        self.prompts_per_batch, self.shuffle, self.seed, self.epoch = (
            prompts_per_batch,
            shuffle,
            seed,
            0,
        )
        self.seeds_per_group = seeds_per_group

    def use_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as epoch ``epoch``."""
        self.epoch = epoch

    def _chunks(self, members: list[int]) -> list[list[int]]:
        size = self.seeds_per_group or len(members)
        return [members[i : i + size] for i in range(0, len(members), size)]

    def __len__(self) -> int:
        groups = sum(len(self._chunks(self.members[k])) for k in self.keys)
        return math.ceil(groups / self.prompts_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        groups = []
        for key in self.keys:
            members = self.members[key]
            if self.shuffle and self.seeds_per_group:
                order = torch.randperm(len(members), generator=generator).tolist()
                members = [members[i] for i in order]
            groups += self._chunks(members)
        if self.shuffle:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        for start in range(0, len(groups), self.prompts_per_batch):
            yield [i for group in groups[start : start + self.prompts_per_batch] for i in group]
