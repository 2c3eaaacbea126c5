"""Running the methods over prompt sets: batches shared out to processes, cost accounting, judging,
cached rows.

A method's work on a prompt set is cut into the batches one process makes (``batch_size``
consecutive (prompt, seed) keys). With N processes, process r runs units r, r+N, ... of the
list of every unfinished (method, batch), so each key goes through the same batch, at the same
position, as in one process: its images and scores do not depend on N (all methods draw their
noise per key; only floating-point results could depend on a batch's other members).

Each finished batch is written atomically to ``rows/<set>/<label>.parts/``. When every process
is done, the main process merges a method's parts into ``rows/<set>/<label>.json`` (grid
images in ``rows/<set>/<label>/``) and removes the parts. A re-run, with any process count,
reads finished methods back and skips finished batches, so a killed run loses at most the
batch each process was in.

Cost of a merged method: steps and judge calls per image; ``seconds_per_image``, the seconds
of every batch (on whichever process) over the images, i.e. compute time per image rather
than the run's wall time; ``peak_memory_mb``, the largest batch peak on any process.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..judges import Judge
from ..judges.base import score_robustly
from .methods import Run
from .rows import Grid, MethodWork, load_method, merge_method, read_part, save_part

logger = logging.getLogger(__name__)


class PeakMemory:
    """Peak memory above the level at entry, in MB: CUDA allocated memory, else process RSS
    sampled every 5 ms by a background thread."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._proc = psutil.Process()
            self._start = self._peak = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = max(0.0, (peak - self._start) / 2**20)


def process_device(requested: str | None, accelerator: Any, what: str) -> torch.device:
    """The device this process puts ``what`` on: accelerate's unless a recipe names one.

    One process honours any device. With N processes each has its own device, so only a
    device type without index (``cuda``, ``cpu``) matching accelerate's is accepted.
    """
    if requested is None:
        return accelerator.device
    try:
        asked = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(
            f"{what} '{requested}' is not a torch device; use e.g. 'cuda' or 'cpu', or leave it "
            "unset"
        ) from exc
    # accelerate on a GPU means CUDA is there; checked first so no CUDA call runs without need
    if asked.type == "cuda" and accelerator.device.type != "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{what} is '{requested}', but CUDA is not available on this machine; remove {what} or "
            "use cpu"
        )
    if accelerator.num_processes == 1:
        return asked
    if asked.index is None and asked.type == accelerator.device.type:
        return accelerator.device
    raise ConfigError(
        f"{what} is '{requested}', but each of the {accelerator.num_processes} processes runs on "
        f"its own {accelerator.device.type} device; leave {what} unset (accelerate picks it)"
    )


def judge_devices(judge_kwargs: dict, accelerator: Any) -> dict:
    """``judge_kwargs`` with each explicit ``device`` checked and resolved by :func:`process_device`
    (a judge without one picks accelerate's device itself)."""
    return {
        name: {
            **kw,
            "device": str(process_device(kw["device"], accelerator, f"judge_kwargs.{name}.device")),
        }
        if isinstance(kw, dict) and "device" in kw
        else kw
        for name, kw in judge_kwargs.items()
    }


def plan_work(
    rows_dir: Path,
    prompt_sets: dict[str, list],
    seeds: Sequence[int],
    labels: Sequence[str],
    *,
    batch_size: int,
    grid_prompts: int,
) -> list[MethodWork]:
    """Every (prompt set, method) without a ``rows/<set>/<label>.json``, in recipe order."""
    work = []
    for set_name, records in prompt_sets.items():
        folder = rows_dir / set_name
        keys = [(r, s) for r in records for s in seeds]
        batches = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        grid_keys = {(r.prompt_id, seeds[0]) for r in records[:grid_prompts]}
        for label in labels:
            if (folder / f"{label}.json").is_file():
                logger.info(
                    "%s/%s: finished in an earlier run, read from %s", set_name, label, folder
                )
            else:
                work.append(MethodWork(folder, label, batches, grid_keys))
    return work


def run_share(
    work: Sequence[MethodWork],
    runs: dict[str, Run],
    judges: dict[str, Judge],
    *,
    process_index: int,
    num_processes: int,
    device: torch.device,
) -> None:
    """This process's units r, r+N, ... of all (method, batch) in ``work``; finished ones are
    skipped."""
    units = [(w, i) for w in work for i in range(len(w.batches))]
    mine = units[process_index::num_processes]
    todo = [(w, i) for w, i in mine if read_part(w, i) is None]
    logger.info(
        "%d batches of unfinished methods; process %d takes %d (%d done in an earlier run)",
        len(units),
        process_index,
        len(mine),
        len(mine) - len(todo),
    )
    for w, i in tqdm(
        todo, desc=f"evaluate (process {process_index})", unit="batch", disable=process_index != 0
    ):
        part, grid = run_batch(runs[w.label], w.batches[i], judges, device, w.grid_keys)
        save_part(w, i, part, grid)


def _judge_rows(
    judges: dict[str, Judge],
    images: list[Image.Image],
    batch: Sequence[tuple],
    seeds: Sequence[int],
) -> list[dict]:
    """One row per image with every evaluation judge's overall score and concept scores."""
    prompts = [r.prompt for r, _ in batch]
    rows = [
        {"prompt_id": r.prompt_id, "prompt": r.prompt, "seed": s, "scores": {}, "concepts": {}}
        for (r, _), s in zip(batch, seeds)
    ]
    for name, judge in judges.items():
        concepts = [copy.deepcopy(list(r.concepts)) if r.concepts else None for r, _ in batch]
        for row, (feedback, _error) in zip(rows, score_robustly(judge, images, prompts, concepts)):
            row["scores"][name] = float("nan") if feedback is None else feedback.overall
            row["concepts"][name] = (
                []
                if feedback is None
                else [{"kind": c.kind, "text": c.text, "score": c.score} for c in feedback.concepts]
            )
    return rows


def run_batch(
    run: Run,
    batch: Sequence[tuple],
    judges: dict[str, Judge],
    device: torch.device,
    grid_keys: set[tuple[str, int]],
) -> tuple[dict, Grid]:
    """Rows and cost of one batch of (record, seed) keys, and its images among ``grid_keys``."""
    prompts = [r.prompt for r, _ in batch]
    ids = [r.prompt_id for r, _ in batch]
    concepts = [list(r.concepts) if r.concepts else None for r, _ in batch]
    seeds = [s for _, s in batch]
    with PeakMemory(device) as memory:
        began = time.perf_counter()
        out = run(prompts, ids, concepts, seeds)
        seconds = time.perf_counter() - began
    part = {
        "keys": [[p, s] for p, s in zip(ids, seeds)],
        "rows": _judge_rows(judges, list(out.images), batch, seeds),
        "denoising_steps": [float(x) for x in out.denoising_steps],
        "judge_calls": [int(x) for x in out.judge_calls],
        "seconds": seconds,
        "peak_memory_mb": memory.peak_mb,
    }
    grid = {(p, s): image for p, s, image in zip(ids, seeds, out.images) if (p, s) in grid_keys}
    return part, grid


def merged_results(
    rows_dir: Path, work: Sequence[MethodWork], set_names: Sequence[str], labels: Sequence[str]
) -> dict[str, dict[str, tuple[list[dict], dict, Grid]]]:
    """Main process: merge ``work``'s parts, then every method's rows, cost and grid, per prompt
    set."""
    for method in work:
        merge_method(method)
    return {s: {label: load_method(rows_dir / s, label) for label in labels} for s in set_names}
