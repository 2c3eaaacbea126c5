"""The evaluate stage's ``rows/`` folder: each batch's part, and each finished method's rows.

``rows/<set>/<label>.parts/NNNNN.json`` is one batch of an unfinished method (its grid images
beside it); ``rows/<set>/<label>.json`` a finished method's rows and cost, its grid images in
``rows/<set>/<label>/``. Each JSON is written last and atomically: its presence marks the
batch or the method as done (see :mod:`noisealign.evaluation.runner`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import DataError
from .report import write_json

Grid = dict[tuple[str, int], Image.Image]


@dataclass
class MethodWork:
    """One unfinished method on one prompt set: the one-process batches of (record, seed) keys."""

    folder: Path  # rows/<set>
    label: str
    batches: list[list[tuple]]
    grid_keys: set[tuple[str, int]]

    @property
    def parts(self) -> Path:
        return self.folder / f"{self.label}.parts"


def save_part(work: MethodWork, index: int, part: dict, grid: Grid) -> None:
    """Grid PNGs first, then the part's JSON (atomic; its presence marks the batch as done)."""
    work.parts.mkdir(parents=True, exist_ok=True)
    names = {}
    for j, ((prompt_id, seed), image) in enumerate(sorted(grid.items())):
        names[f"{prompt_id}|{seed}"] = name = f"{index:05d}-{j:03d}.png"
        image.save(work.parts / name)
    write_json(work.parts / f"{index:05d}.json", {**part, "grid": names})


def read_part(work: MethodWork, index: int) -> dict | None:
    """A batch's saved part, or ``None`` if missing or cut with another ``batch_size``."""
    path = work.parts / f"{index:05d}.json"
    if not path.is_file():
        return None
    part = json.loads(path.read_text())
    keys = [[r.prompt_id, s] for r, s in work.batches[index]]
    return part if part["keys"] == keys else None


def merge_method(work: MethodWork) -> None:
    """Main process, after every process ran its share: the parts -> ``<label>.json``, parts
    removed."""
    rows, steps, calls, seconds, peak, grid = [], [], [], 0.0, 0.0, {}
    for index in range(len(work.batches)):
        part = read_part(work, index)
        if part is None:
            raise DataError(
                f"{work.parts} lacks batch {index}; run the same command again to finish it"
            )
        rows += part["rows"]
        steps += part["denoising_steps"]
        calls += part["judge_calls"]
        seconds += part["seconds"]
        peak = max(peak, part["peak_memory_mb"])
        for key, name in part["grid"].items():
            prompt_id, _, seed = key.rpartition("|")
            grid[(prompt_id, int(seed))] = Image.open(work.parts / name).convert("RGB")
    n = max(1, len(rows))
    cost = {
        "denoising_steps": sum(steps) / n,
        "judge_calls": sum(calls) / n,
        "seconds_per_image": seconds / n,
        "peak_memory_mb": peak,
    }
    save_method(work.folder, work.label, rows, cost, grid)
    shutil.rmtree(work.parts)


def save_method(folder: Path, label: str, rows: list[dict], cost: dict, grid: Grid) -> None:
    """Grid PNGs first, then the rows file (its presence marks the method as finished)."""
    image_dir = folder / label
    image_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, ((prompt_id, seed), image) in enumerate(sorted(grid.items())):
        names[f"{prompt_id}|{seed}"] = f"{i:03d}.png"
        image.save(image_dir / f"{i:03d}.png")
    write_json(folder / f"{label}.json", {"rows": rows, "cost": cost, "grid": names})


def load_method(folder: Path, label: str) -> tuple[list[dict], dict, Grid] | None:
    """A finished method's rows, cost and grid images, or ``None`` when it has not finished."""
    path = folder / f"{label}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    grid = {}
    for key, name in saved["grid"].items():
        prompt_id, _, seed = key.rpartition("|")
        grid[(prompt_id, int(seed))] = Image.open(folder / label / name).convert("RGB")
    return saved["rows"], saved["cost"], grid
