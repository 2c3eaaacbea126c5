"""Output folders: never an input of the same run, never another stage's files, one writer.

Each case runs the real command line in-process (``noisealign.cli.main``) and checks exit 2,
one logged error line naming the problem, and every earlier file byte-identical.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from noisealign.cli import main as cli_main

from .test_bad_inputs import (
    ROOT,
    collect,
    collect_npd,
    distill,
    evaluate,
    generate,
    snapshot,
    train_projector,
)

pytestmark = pytest.mark.reliability
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def refused(argv, caplog) -> str:
    """Run ``argv``; assert exit 2 with one error line and return that line."""
    with caplog.at_level(logging.ERROR, logger="noisealign"), pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].strip(), errors
    return errors[0]


def runs(argv) -> None:
    try:
        cli_main(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code


def evaluate_policy(t, out, *extra, policy):
    return evaluate(
        t,
        out,
        *extra,
        methods={"standard": {"type": "standard"}, "p": {"type": "policy", "policy": str(policy)}},
    )


# (id, input copied from the tiny fixture, where output_dir goes relative to that copy,
#  argv builder taking (tiny, out, copy), field named in the message)
OVERLAPS = [
    (
        "train_projector-is-reward_model",
        "reward",
        ".",
        lambda t, out, c: train_projector(t, out, "--reward_model", str(c)),
        r"is the reward_model folder",
    ),
    (
        "generate-is-projector",
        "projector",
        ".",
        lambda t, out, c: generate(t, out, "--projector", str(c)),
        r"is the projector folder",
    ),
    (
        "evaluate-is-policy",
        "projector",
        ".",
        lambda t, out, c: evaluate_policy(t, out, policy=c),
        r"is the methods.p.policy folder",
    ),
    (
        "distill-inside-dataset",
        "data",
        "sub",
        lambda t, out, c: distill(t, out, "--dataset", str(c)),
        r"lies inside the dataset folder",
    ),
    (
        "collect_npd-inside-pipeline",
        "sd",
        "npd",
        lambda t, out, c: collect_npd(t, out, "--pipeline", str(c)),
        r"lies inside the pipeline folder",
    ),
    (
        "collect-contains-pipeline",
        "sd",
        "..",
        lambda t, out, c: collect(t, out, "--pipeline", str(c)),
        r"contains the pipeline",
    ),
    (
        "image_npd-contains-dataset",
        "data",
        "..",
        lambda t, out, c: [
            "image_npd",
            "--dataset",
            str(c),
            "--pipeline",
            str(t / "sd"),
            "--output_dir",
            str(out),
        ],
        r"contains the dataset",
    ),
]


@pytest.mark.parametrize(
    "source, where, make_argv, message", [c[1:] for c in OVERLAPS], ids=[c[0] for c in OVERLAPS]
)
def test_output_dir_overlapping_an_input_is_refused(
    tiny, tmp_path, caplog, source, where, make_argv, message
):
    copy = tmp_path / "work" / source
    shutil.copytree(tiny / source, copy)
    out = (copy / where) if where != ".." else copy.parent
    before = snapshot(tmp_path / "work")
    line = refused(make_argv(tiny, out, copy), caplog)
    assert re.search(rf"output_dir '.*' {message}", line) and "choose" in line, line
    assert snapshot(tmp_path / "work") == before


def _foreign(out: Path, *names: str) -> None:
    out.mkdir(parents=True)
    for name in names:
        (out / name).write_bytes(b"an earlier run's " + name.encode())


# (id, argv builder, files already in output_dir, message, whether overwrite lets it run)
FOREIGN = [
    ("evaluate-report", evaluate, ("report.md",), r"already holds report.md", True),
    (
        "train_projector-weights",
        train_projector,
        ("model.safetensors", "config.json"),
        r"already holds model.safetensors",
        True,
    ),
    ("generate-png", generate, ("000_seed0.png",), r"already holds \*.png", True),
    (
        "collect-weights",
        collect,
        ("model.safetensors",),
        r"holds another stage's output: saved model weights",
        False,
    ),
    (
        "distill-report",
        distill,
        ("report.md",),
        r"holds another stage's output: an evaluation report",
        False,
    ),
]


@pytest.mark.parametrize(
    "make_argv, files, message, overwritable", [c[1:] for c in FOREIGN], ids=[c[0] for c in FOREIGN]
)
def test_folder_of_unknown_origin_is_refused(
    tiny, tmp_path, caplog, make_argv, files, message, overwritable
):
    out = tmp_path / "out"
    _foreign(out, *files)
    before = snapshot(out)
    assert re.search(message, refused(make_argv(tiny, out), caplog))
    assert snapshot(out) == before
    if overwritable:
        runs(make_argv(tiny, out, "--overwrite_output_dir", "true"))
    else:
        caplog.clear()
        refused(make_argv(tiny, out, "--overwrite_output_dir", "true"), caplog)
        assert snapshot(out) == before


HOLD_LOCK = (
    "import sys, time; from noisealign.outputs import lock_output_dir; "
    "lock_output_dir(sys.argv[1]); print('held', flush=True); time.sleep(60)"
)


@pytest.mark.parametrize(
    "make_argv", [distill, train_projector, evaluate], ids=lambda f: f.__name__
)
def test_folder_held_by_another_run_is_refused(tiny, tmp_path, caplog, make_argv):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(make_argv(tiny, out), caplog)
        assert f"another run holds {out} (pid {holder.pid})" in line, line
        assert not out.exists() or not any(out.iterdir())
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_concurrent_collects_one_is_refused_the_other_completes(tiny, tmp_path, caplog):
    import datasets

    out = tmp_path / "out"
    argv = collect(tiny, out, "--seeds", "0:32", "--chunk_size", "4")
    first = subprocess.Popen(
        [sys.executable, "-c", "from noisealign.cli import main; main()", *argv],
        cwd=ROOT,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid_file = tmp_path / ".out.lock.pid"
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and pid_file.read_text().strip() == str(first.pid)):
        assert first.poll() is None and time.monotonic() < deadline, (
            "the first collect never took the lock"
        )
        time.sleep(0.05)
    line = refused(argv, caplog)
    assert first.poll() is None, (
        "the first collect finished before the second started; give it more seeds"
    )
    assert f"another run holds {out} (pid {first.pid})" in line, line
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    rows = datasets.load_from_disk(str(out / "dataset"))
    keys = list(zip(rows["prompt_id"], rows["seed"]))
    assert len(keys) == len(set(keys)) == 4 * 32
    assert not list((out / "shards").glob(".tmp-*"))


def test_stale_temporaries_and_lock_of_a_killed_run_are_cleaned_on_the_next_start(tiny, tmp_path):
    import datasets

    out = tmp_path / "out"
    runs(collect(tiny, out))
    rows = datasets.load_from_disk(str(out / "dataset")).to_list()
    # what a run killed midway leaves: an unrenamed shard, a half-replaced dataset, its lock
    (out / "shards" / ".tmp-shard-x").mkdir()
    (out / "shards" / ".tmp-shard-x" / "data-00000-of-00001.arrow").write_bytes(b"half")
    shutil.copytree(out / "dataset", out / ".old-dataset")
    (tmp_path / ".out.lock").write_text("")
    (tmp_path / ".out.lock.pid").write_text("999999\n")
    runs(collect(tiny, out))
    assert not (out / "shards" / ".tmp-shard-x").exists()
    assert not (out / ".old-dataset").exists()
    assert datasets.load_from_disk(str(out / "dataset")).to_list() == rows
