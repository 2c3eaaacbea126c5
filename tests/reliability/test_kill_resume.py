"""SIGKILL at random points, then the same command again: nothing lost, duplicated or changed.

Already covered elsewhere (not repeated): collect killed after 1 and 3 shards
(tests/test_collect.py), collect_npd killed once (tests/test_collect_npd.py), and resume
equality of distill / train_projector / train_npnet after *deleting* the last checkpoint
(their tests). New here: several kills at seeded random moments (so some land while a shard
or a checkpoint is being written), every shard readable after each kill, and the training
stages killed for real in a subprocess, whose loss curve after ``--resume_from_checkpoint
latest`` must equal the uninterrupted run's, step for step.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from .test_bad_inputs import collect, collect_npd, distill, train_npnet, train_projector

pytestmark = [pytest.mark.reliability, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _default_sigint() -> None:
    # a test run started in the background by a non-interactive shell (`bash .ci/run &`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: Ctrl-C tests need it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(argv: list[str]) -> subprocess.Popen:
    stage, *rest = argv
    return subprocess.Popen(
        [sys.executable, "-m", f"noisealign.{stage}", *rest],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _kill_when(proc: subprocess.Popen, ready, delay: float, what: str) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds."""
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None, (
            f"finished before the kill ({what}): {proc.stderr.read()[-1500:]}"
        )
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# ---- collect / collect_npd: three kills, then a clean finish --------------------------------
def _shards(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("shard-*"))


@pytest.mark.parametrize("stage", ["collect", "collect_npd"])
def test_killed_three_times_at_random_points_then_complete(tiny, tmp_path, stage):
    build = {"collect": collect, "collect_npd": collect_npd}[stage]
    settings = ["--seeds", "0:8", "--chunk_size", "2", "--batch_size", "2"]
    argv = build(tiny, tmp_path / "killed", *settings)
    rng = random.Random(f"kill-{stage}")
    for _ in range(3):
        target = len(_shards(tmp_path / "killed")) + rng.randint(
            1, 3
        )  # progress, by varying amounts

        def ready(target=target):
            return len(_shards(tmp_path / "killed")) >= target

        _kill_when(_launch(argv), ready, rng.uniform(0, 0.3), f"shard {target}")
        for shard in _shards(tmp_path / "killed"):  # no corrupt shard: every one reads back
            assert datasets.load_from_disk(str(shard)).num_rows > 0, shard
        assert not (tmp_path / "killed" / "dataset").exists()
    finished = _launch(argv)
    assert finished.wait(timeout=300) == 0, finished.stderr.read()[-2000:]

    from noisealign.cli import STAGES

    module = __import__(STAGES[stage], fromlist=["main"])
    reference = module.main(build(tiny, tmp_path / "reference", *settings)[1:]).to_list()
    rows = datasets.load_from_disk(str(tmp_path / "killed" / "dataset")).to_list()
    keys = [(r["prompt_id"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4 * 8  # complete, no duplicate
    assert rows == reference


# ---- training stages: a real SIGKILL, then resume from the latest checkpoint ------------------
@pytest.fixture(scope="module")
def noise_pairs(tiny, tmp_path_factory):
    from noisealign import collect_npd as stage

    out = tmp_path_factory.mktemp("pairs")
    stage.main(collect_npd(tiny, out, "--seeds", "0:2")[1:])
    return out


STEPS = 24
TRAINING = {
    "distill": lambda t, pairs, out: distill(
        t, out, "--max_steps", str(STEPS), "--logging_steps", "1", "--eval_steps", "0"
    ),
    "train_projector": lambda t, pairs, out: train_projector(
        t, out, "--max_steps", str(STEPS), "--logging_steps", "1"
    ),
    "train_npnet": lambda t, pairs, out: train_npnet(
        t,
        out,
        "--dataset",
        str(pairs),
        "--margin",
        "-1",
        "--max_steps",
        str(STEPS),
        "--logging_steps",
        "1",
    ),
}


@pytest.mark.parametrize("stage", list(TRAINING))
def test_sigkill_then_resume_gives_the_uninterrupted_loss_curve(tiny, noise_pairs, tmp_path, stage):
    from noisealign.cli import STAGES

    module = __import__(STAGES[stage], fromlist=["main"])
    build = TRAINING[stage]
    full = module.main(build(tiny, noise_pairs, tmp_path / "full")[1:] + ["--save_steps", "100"])
    losses = {h["step"]: h["loss"] for h in full.history}
    assert sorted(losses) == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    argv = build(tiny, noise_pairs, killed) + ["--save_steps", "1", "--save_total_limit", "3"]
    rng = random.Random(f"kill-{stage}")
    step = rng.randint(2, 10)
    _kill_when(
        _launch(argv),
        lambda: (killed / "checkpoints" / f"checkpoint-{step}").exists(),
        rng.uniform(0, 0.2),
        f"checkpoint-{step}",
    )
    resumed = module.main(argv[1:] + ["--resume_from_checkpoint", "latest"])
    after = {h["step"]: h["loss"] for h in resumed.history}
    assert after and min(after) >= step and max(after) == STEPS
    assert after == {s: losses[s] for s in after}  # bit-identical loss after the resume
    final, reference = (
        load_file(killed / "model.safetensors"),
        load_file(tmp_path / "full" / "model.safetensors"),
    )
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)
