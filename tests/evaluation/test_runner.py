"""Sharing a method's batches out to processes: the merged rows equal one process's, resume,
devices."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from noisealign.baselines import MethodOutput
from noisealign.data.prompts import PromptRecord
from noisealign.errors import ConfigError
from noisealign.evaluation.runner import (
    judge_devices,
    load_method,
    merged_results,
    plan_work,
    process_device,
    run_share,
)
from noisealign.judges.base import Feedback

PROMPTS = {"mini": [PromptRecord(f"p{i}", f"prompt {i}") for i in range(5)]}
SEEDS = [0, 1]


class BatchSensitive:
    """A method whose image of a key also depends on the key's batch (position and size), as
    floating-point results can; it records every batch it is called with."""

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, prompts, prompt_ids, concepts, seeds):
        self.calls.append(tuple(zip(prompt_ids, seeds)))
        shades = [
            (10 * int(p[1:]) + 3 * s + 7 * i + len(seeds)) % 256
            for i, (p, s) in enumerate(zip(prompt_ids, seeds))
        ]
        images = [Image.new("RGB", (4, 4), (v, 0, 0)) for v in shades]
        return MethodOutput(
            images, torch.zeros(len(seeds), 1), [2.0] * len(seeds), [1] * len(seeds)
        )


class RedJudge:
    name = "red"

    def score(self, images, prompts, concepts=None):
        return [Feedback(overall=image.getpixel((0, 0))[0] / 255) for image in images]


def evaluate_in(root, num_processes, ranks=None, run=None):
    """Plan, run the given ranks' shares (default: all) one after another; the run's method."""
    run = run or BatchSensitive()
    work = plan_work(root, PROMPTS, SEEDS, ["m"], batch_size=3, grid_prompts=2)
    for rank in range(num_processes) if ranks is None else ranks:
        run_share(
            work,
            {"m": run},
            {"red": RedJudge()},
            process_index=rank,
            num_processes=num_processes,
            device=torch.device("cpu"),
        )
    return work, run


def pixels(grid):
    return {key: list(image.getdata()) for key, image in grid.items()}


def test_two_processes_run_the_one_process_batches_and_merge_into_its_rows(tmp_path):
    work1, run1 = evaluate_in(tmp_path / "one", 1)
    one = merged_results(tmp_path / "one", work1, ["mini"], ["m"])["mini"]["m"]
    work2, run2 = evaluate_in(tmp_path / "two", 2)
    two = merged_results(tmp_path / "two", work2, ["mini"], ["m"])["mini"]["m"]
    # 10 keys in batches of 3: process 0 runs batches 0 and 2, process 1 batches 1 and 3
    assert run2.calls == [run1.calls[0], run1.calls[2], run1.calls[1], run1.calls[3]]
    assert len(run1.calls) == 4 and [len(c) for c in run1.calls] == [3, 3, 3, 1]
    assert two[0] == one[0] and [r["seed"] for r in two[0][:3]] == [0, 1, 0]
    assert {r["prompt_id"] for r in two[0]} == {f"p{i}" for i in range(5)}
    assert two[1]["denoising_steps"] == one[1]["denoising_steps"] == 2.0
    assert two[1]["judge_calls"] == 1.0
    assert pixels(two[2]) == pixels(one[2]) and set(two[2]) == {("p0", 0), ("p1", 0)}
    assert not (tmp_path / "two" / "mini" / "m.parts").exists()


def test_a_killed_run_resumes_with_another_process_count(tmp_path):
    work, reference = evaluate_in(tmp_path / "ref", 1)
    expected = merged_results(tmp_path / "ref", work, ["mini"], ["m"])["mini"]["m"]
    # process 1 of 2 died before any batch: only process 0's parts are on disk
    evaluate_in(tmp_path / "run", 2, ranks=[0])
    parts = tmp_path / "run" / "mini" / "m.parts"
    assert sorted(p.name for p in parts.glob("*.json")) == ["00000.json", "00002.json"]
    assert load_method(tmp_path / "run" / "mini", "m") is None
    # the rerun, in one process, runs only the two missing batches
    work, rerun = evaluate_in(tmp_path / "run", 1)
    assert rerun.calls == [reference.calls[1], reference.calls[3]]
    rows, cost, grid = merged_results(tmp_path / "run", work, ["mini"], ["m"])["mini"]["m"]
    assert rows == expected[0] and cost["denoising_steps"] == expected[1]["denoising_steps"]
    assert cost["seconds_per_image"] > 0  # the seconds of both runs' batches, over the images
    assert pixels(grid) == pixels(expected[2])
    # a finished method is read back, not planned
    assert plan_work(tmp_path / "run", PROMPTS, SEEDS, ["m"], batch_size=3, grid_prompts=2) == []


def test_a_part_cut_with_another_batch_size_is_run_again(tmp_path):
    evaluate_in(tmp_path, 2, ranks=[0])
    part = tmp_path / "mini" / "m.parts" / "00000.json"
    saved = json.loads(part.read_text())
    saved["keys"] = saved["keys"][:2]  # as written by a run with batch_size 2
    part.write_text(json.dumps(saved))
    _, rerun = evaluate_in(tmp_path, 1)
    assert [("p0", 0), ("p0", 1), ("p1", 0)] == list(rerun.calls[0])
    assert len(rerun.calls) == 3  # batch 0 again, and process 1's batches 1 and 3


def accelerator(device, num_processes):
    return SimpleNamespace(device=torch.device(device), num_processes=num_processes)


def test_each_process_gets_its_own_device_and_a_pinned_one_is_refused():
    assert process_device(None, accelerator("cuda:1", 2), "device") == torch.device("cuda:1")
    assert process_device("cuda", accelerator("cuda:1", 2), "device") == torch.device("cuda:1")
    assert process_device("cpu", accelerator("cuda:0", 1), "device") == torch.device("cpu")
    with pytest.raises(
        ConfigError,
        match=(
            r"device is 'cuda:0', but each of the 2 processes runs on its own cuda device; leave "
            r"device unset"
        ),
    ):
        process_device("cuda:0", accelerator("cuda:1", 2), "device")
    with pytest.raises(ConfigError, match="judge_kwargs.vlm.device is 'cpu'"):
        process_device("cpu", accelerator("cuda:0", 2), "judge_kwargs.vlm.device")
    kwargs = {"vlm": {"model": "m", "device": "cuda"}, "clip": {"model": "c"}}
    assert judge_devices(kwargs, accelerator("cuda:1", 2)) == {
        "vlm": {"model": "m", "device": "cuda:1"},
        "clip": {"model": "c"},
    }
    with pytest.raises(ConfigError, match="'gpu0' is not a torch device"):
        process_device("gpu0", accelerator("cpu", 1), "device")
