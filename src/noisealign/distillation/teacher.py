"""Teacher labels for the distill stage: a k-step reward model scores fresh noises of the
training prompts.

A pure-noise (k = 0) model learns little from a few judged seeds per prompt, but a k-step
model (scoring x0 after k DDIM steps) ranks seeds well and costs only UNet calls to query.
With ``teacher`` set, distill draws ``teacher_seeds`` fresh seeds for every *training*
prompt, labels each noise with the teacher's token and overall logits, and trains the
student on those soft targets (σ of the logits) instead of the judge's few rows. The held-out
prompts are never labelled: the student is still evaluated against the judge.

Labelling is the expensive part (k CFG UNet calls per noise), so it is split into blocks of
:data:`BATCHES_PER_BLOCK` batches of noises, each written atomically under
``output_dir/teacher_labels`` and shared round-robin over the processes. A killed run keeps its
finished blocks; a rerun, with any number of processes, labels only the missing ones and gets
the same labels.

Example:
    >>> ids, seeds = label_plan(["p1", "p2"], seeds_per_prompt=2, seed_start=1_000_000)
    >>> list(zip(ids, seeds))
    [('p1', 1000000), ('p2', 1000000), ('p1', 1000001), ('p2', 1000001)]
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.feedback import FeedbackDataset, FeedbackRows, PromptBatchSampler
from ..errors import DataError
from ..noise import batch_noise
from ..pipelines import PromptEmbeddings
from ..rewards.features import precompute_features, score_noise
from .trainer import PromptTable, evaluate

if TYPE_CHECKING:
    from .stage import DistillInputs

logger = logging.getLogger(__name__)

BATCHES_PER_BLOCK = 8  # labelling batches per label file
LABEL_DIR = "teacher_labels"
MANIFEST = "manifest.json"


def label_plan(
    train_ids: Sequence[str], seeds_per_prompt: int, seed_start: int
) -> tuple[list[str], list[int]]:
    """``(prompt_ids, seeds)`` to label: every training prompt with each of the seeds,
    seed-major."""
    ids = [pid for _ in range(seeds_per_prompt) for pid in train_ids]
    seeds = [seed_start + s for s in range(seeds_per_prompt) for _ in train_ids]
    return ids, seeds


def check_teacher_split(teacher: str, eval_ids: Sequence[str]) -> None:
    """:class:`DataError` when the teacher was trained on one of this run's held-out prompts.

    A teacher saved by distill records its held-out prompt ids in ``metrics.json``; the
    student's held-out prompts must be among them, or the evaluation would reward a leak.
    """
    path = Path(teacher, "metrics.json")
    try:
        held_out = json.loads(path.read_text())["info"]["eval_prompt_ids"]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning(
            "teacher '%s' does not record its held-out prompts "
            "(metrics.json info.eval_prompt_ids); "
            "make sure it was distilled with the same eval_fraction and split_seed as this run",
            teacher,
        )
        return
    leaked = sorted(set(eval_ids) - set(held_out))
    if leaked:
        raise DataError(
            f"the teacher '{teacher}' was trained on {len(leaked)} of this run's held-out prompts "
            f"(e.g. {', '.join(leaked[:3])}); use the teacher's split (its eval_fraction and "
            "split_seed, see its metrics.json) so the student is evaluated on prompts neither "
            "model saw"
        )


def _fingerprint(teacher: str) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        file = Path(teacher, name)
        if file.is_file():
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _check_manifest(folder: Path, manifest: dict, overwrite: bool) -> None:
    """Keep matching labels; refuse (or, with ``overwrite``, delete) labels of another plan."""
    file = folder / MANIFEST
    if file.is_file():
        try:
            found = json.loads(file.read_text())
        except ValueError:
            found = {}
        if found == manifest:
            return
        if not overwrite:
            diff = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
            raise DataError(
                f"'{folder}' holds teacher labels of another teacher or plan (differs in: "
                f"{', '.join(diff) or 'unreadable manifest'}); pass --overwrite_output_dir true "
                "to relabel, or choose another output_dir"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, file)


@torch.no_grad()
def _label_block(
    teacher: Any,
    pipe: Any,
    table: PromptEmbeddings,
    position: dict[str, int],
    ids: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    tokens, overall = [], []
    for start in range(0, len(ids), batch_size):
        part_ids, part_seeds = ids[start : start + batch_size], seeds[start : start + batch_size]
        emb = table.select([position[p] for p in part_ids]).to(pipe.device, pipe.dtype)
        x = batch_noise(part_ids, part_seeds, latent_shape).to(pipe.device, pipe.dtype)
        out = score_noise(teacher, x, emb, pipe)
        tokens.append(out.token_logits.float().cpu())
        overall.append(out.overall_logit.float().cpu())
    return {"token_logits": torch.cat(tokens), "overall_logit": torch.cat(overall)}


def _manifest(teacher_path: str, ids, seeds, latent_shape, block: int) -> dict:
    """What a label folder must have been written for: teacher weights, noises, block size."""
    plan = hashlib.sha256(json.dumps([list(ids), list(seeds)]).encode()).hexdigest()
    return {
        "teacher": str(teacher_path),
        "teacher_sha256": _fingerprint(teacher_path),
        "noises": len(ids),
        "prompts": len(set(ids)),
        "first_seed": min(seeds, default=0),
        "plan_sha256": plan,  # the (prompt id, seed) of every noise, in order
        "latent_shape": list(latent_shape),
        "block": block,
    }


def _write_block(folder: Path, b: int, labels: dict, teacher_path: str, process: int) -> None:
    """Block ``b``'s labels, refused when the teacher gave NaN/Inf, written atomically."""
    bad = (~torch.isfinite(labels["overall_logit"])).sum() + (
        ~torch.isfinite(labels["token_logits"]).all(1)
    ).sum()
    if bad:
        raise DataError(
            f"the teacher '{teacher_path}' gave NaN/Inf scores for noises of block {b}; "
            "check the teacher folder (load it with load_reward_model) or distill it again"
        )
    target = folder / f"block-{b:05d}.safetensors"
    tmp = target.with_suffix(f".tmp{process}")
    save_file(labels, str(tmp))
    os.replace(tmp, target)  # a killed run never leaves a half-written block behind


def teacher_labels(
    accelerator: Any, config: Any, inputs: DistillInputs, ids: Sequence[str], seeds: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The teacher's ``token_logits`` (N, L) and ``overall_logit`` (N,) of each (prompt, seed)
    noise.

    Blocks already under ``output_dir/teacher_labels`` (same teacher weights, prompts and
    seeds) are reused; each process labels the missing blocks ``b`` with
    ``b % num_processes == process_index``; every process returns all labels.
    """
    teacher, teacher_path, shape = inputs.teacher, config.teacher, inputs.rows.latent_shape
    batch_size = config.feature_batch_size
    folder = Path(config.output_dir, LABEL_DIR)
    block = BATCHES_PER_BLOCK * batch_size
    if accelerator.is_main_process:  # the others wait; a refusal stops the whole launch
        manifest = _manifest(teacher_path, ids, seeds, shape, block)
        _check_manifest(folder, manifest, config.overwrite_output_dir)
    accelerator.wait_for_everyone()
    position = {pid: i for i, pid in enumerate(inputs.prompt_order)}
    blocks = range(0, -(-len(ids) // block))
    mine = [
        b
        for b in blocks
        if b % accelerator.num_processes == accelerator.process_index
        and not (folder / f"block-{b:05d}.safetensors").is_file()
    ]
    teacher.eval()
    for b in tqdm(mine, desc="teacher labels", disable=not accelerator.is_local_main_process):
        span = slice(b * block, (b + 1) * block)
        labels = _label_block(
            teacher, inputs.pipe, inputs.table, position, ids[span], seeds[span], shape, batch_size
        )
        _write_block(folder, b, labels, teacher_path, accelerator.process_index)
    accelerator.wait_for_everyone()
    parts = [_read_block(folder, b, min(block, len(ids) - b * block)) for b in blocks]
    return {key: torch.cat([p[key] for p in parts]) for key in ("token_logits", "overall_logit")}


def _read_block(folder: Path, b: int, size: int) -> dict[str, torch.Tensor]:
    path = folder / f"block-{b:05d}.safetensors"
    try:
        labels = load_file(str(path))
        if labels["overall_logit"].shape != (size,) or len(labels["token_logits"]) != size:
            raise ValueError(f"holds {len(labels['overall_logit'])} labels, expected {size}")
    except Exception as exc:  # unreadable header, missing tensor, wrong length
        raise DataError(
            f"teacher label block '{path}' is corrupt ({str(exc)[:120]}); delete it and rerun, "
            "which labels that block again"
        ) from exc
    return labels


def teacher_rows(
    rows: FeedbackRows,
    ids: Sequence[str],
    seeds: Sequence[int],
    labels: dict[str, torch.Tensor],
    teacher_path: str,
) -> FeedbackRows:
    """Synthetic rows: the prompt's tokens and scored-token mask, σ of the teacher's logits as
    targets.

    Their noise is re-derived from (prompt id, seed), like collected rows without stored noise.
    """
    first: dict[str, int] = {}
    for i, pid in enumerate(rows.prompt_ids):
        first.setdefault(pid, i)
    return replace(
        rows.select([first[pid] for pid in ids]),  # each prompt's text, tokens and token mask
        seeds=list(seeds),
        overall=torch.sigmoid(labels["overall_logit"]),
        token_targets=torch.sigmoid(labels["token_logits"]),
        noise=None,
        judges=[f"teacher {teacher_path}"],
        skipped_failed=0,
        skipped_nonfinite=[],
    )


def teacher_training_rows(
    accelerator: Any, config: Any, inputs: DistillInputs, eval_rows: FeedbackRows
) -> tuple[FeedbackRows, dict[str, float]]:
    """The teacher's labels of fresh noises as training rows, and its own held-out metrics."""
    teacher, pipe, table, order = inputs.teacher, inputs.pipe, inputs.table, inputs.prompt_order
    ids, seeds = label_plan(inputs.train_ids, config.teacher_seeds, config.teacher_seed_start)
    labels = teacher_labels(accelerator, config, inputs, ids, seeds)
    cfg = teacher.config
    features = precompute_features(
        pipe,
        eval_rows,
        table,
        order,
        steps=cfg.input_steps,
        kind=cfg.input_kind,
        batch_size=config.feature_batch_size,
    )
    held_out = FeedbackDataset(eval_rows, range(len(eval_rows)), order, features)
    sampler = PromptBatchSampler(held_out.prompt, config.prompts_per_batch, False)
    loader = DataLoader(held_out, batch_sampler=sampler)
    metrics = evaluate(accelerator, teacher, loader, PromptTable.on(table, accelerator.device))
    logger.info(
        "%d noises (%d seeds x %d training prompts) labelled by the teacher; its held-out "
        "metrics: %s",
        len(ids),
        config.teacher_seeds,
        len(inputs.train_ids),
        {k: round(v, 4) for k, v in metrics.items()},
    )
    return teacher_rows(inputs.rows, ids, seeds, labels, config.teacher), metrics
