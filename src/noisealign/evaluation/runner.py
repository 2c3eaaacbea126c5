"""Running one method over a prompt set: batches, cost accounting, judging, cached rows.

A method's rows are written to ``rows/<set>/<label>.json`` (atomically) when the method has
finished, with the grid images beside them, so a re-run of the same recipe skips finished
methods and a killed run loses at most the method it was running.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..judges import Judge
from ..judges.base import score_robustly
from .methods import Run
from .report import write_json


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


def run_method(
    run: Run,
    keys: Sequence[tuple],
    judges: dict[str, Judge],
    *,
    batch_size: int,
    device: torch.device,
    grid_keys: set[tuple[str, int]],
    desc: str,
) -> tuple[list[dict], dict, dict[tuple[str, int], Image.Image]]:
    """Rows, per-image cost and the grid images of one method over ``keys`` = [(record, seed)]."""
    rows, steps, calls, seconds, peak = [], [], [], 0.0, 0.0
    grid: dict[tuple[str, int], Image.Image] = {}
    for start in tqdm(range(0, len(keys), batch_size), desc=desc, unit="batch"):
        batch = keys[start : start + batch_size]
        prompts = [r.prompt for r, _ in batch]
        ids = [r.prompt_id for r, _ in batch]
        concepts = [list(r.concepts) if r.concepts else None for r, _ in batch]
        seeds = [s for _, s in batch]
        with PeakMemory(device) as memory:
            began = time.perf_counter()
            out = run(prompts, ids, concepts, seeds)
            seconds += time.perf_counter() - began
        peak = max(peak, memory.peak_mb)
        steps += list(out.denoising_steps)
        calls += list(out.judge_calls)
        rows += _judge_rows(judges, list(out.images), batch, seeds)
        for (record, seed), image in zip(batch, out.images):
            if (record.prompt_id, seed) in grid_keys:
                grid[(record.prompt_id, seed)] = image
    n = max(1, len(keys))
    cost = {
        "denoising_steps": sum(steps) / n,
        "judge_calls": sum(calls) / n,
        "seconds_per_image": seconds / n,
        "peak_memory_mb": peak,
    }
    return rows, cost, grid


def save_method(folder: Path, label: str, rows: list[dict], cost: dict, grid: dict) -> None:
    """Grid PNGs first, then the rows file (its presence marks the method as finished)."""
    image_dir = folder / label
    image_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, ((prompt_id, seed), image) in enumerate(sorted(grid.items())):
        names[f"{prompt_id}|{seed}"] = f"{i:03d}.png"
        image.save(image_dir / f"{i:03d}.png")
    write_json(folder / f"{label}.json", {"rows": rows, "cost": cost, "grid": names})


def load_method(
    folder: Path, label: str
) -> tuple[list[dict], dict, dict[tuple[str, int], Image.Image]] | None:
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
