"""The top-level handler (``noisealign.cli.run_stage``): one line for the user's mistakes, a
traceback for real bugs.

Each class of input or environment failure runs the real command line in-process
(``noisealign.cli.main``) and must exit 2 with exactly one error line naming the path or field,
leaving earlier files byte-identical. A real read-only folder and a real full disk are small
tmpfs mounts (root only; skipped with the reason otherwise). Ctrl-C and SIGTERM go to a real
process during collect and during training; the rerun must finish what was left.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import datasets
import pytest
import torch

from noisealign.cli import main as cli_main
from noisealign.errors import NoiseAlignError
from noisealign.failures import INTERRUPTED, explain

from .test_bad_inputs import collect, evaluate, generate, snapshot, train_projector
from .test_kill_resume import _launch

pytestmark = pytest.mark.reliability
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def run_cli(argv: list[str], caplog) -> tuple[int, list[str]]:
    """Exit status and the error lines logged by ``noisealign ARGV``."""
    with caplog.at_level(logging.ERROR, logger="noisealign"), pytest.raises(SystemExit) as exc:
        cli_main(argv)
    return exc.value.code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def assert_earlier_files_unchanged(folder: Path, before: dict) -> None:
    """Every file ``before`` listed is byte-identical (the folder lock may add its own files)."""
    after = snapshot(folder)
    assert {k: after.get(k) for k in before} == before


def assert_one_line(status: int, errors: list[str], message: str, expected_status: int = 2):
    assert status == expected_status, errors
    assert len(errors) == 1, errors
    assert "Traceback" not in errors[0] and "\n" not in errors[0].strip()
    assert re.search(message, errors[0]), errors[0]


# ---- broken inputs ---------------------------------------------------------------------
def copy_pipeline(t: Path, dst: Path) -> Path:
    for src in (t / "sd").rglob("*"):
        if src.is_file():
            (dst / src.relative_to(t / "sd")).parent.mkdir(parents=True, exist_ok=True)
            (dst / src.relative_to(t / "sd")).write_bytes(src.read_bytes())
    return dst


def without_unet(t: Path, tmp: Path) -> Path:
    folder = copy_pipeline(t, tmp / "no-unet")
    for f in (folder / "unet").iterdir():
        f.unlink()
    (folder / "unet").rmdir()
    return folder


def truncated_unet(t: Path, tmp: Path) -> Path:
    folder = copy_pipeline(t, tmp / "truncated")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # a download cut short
    return folder


def latin1_prompts(tmp: Path) -> Path:
    path = tmp / "prompts.txt"
    path.write_bytes("a red circle\na blue square caf\xe9\n".encode("latin-1"))  # é is byte 0xe9
    return path


# Each case: (id, function (tiny, tmp, out) -> argv, regex the one error line must match).
CASES = [
    (
        "prompts-not-utf8",
        lambda t, tmp, out: collect(t, out, "--prompts", str(latin1_prompts(tmp))),
        r"prompt file '.*prompts.txt' is not UTF-8 text \(line 2, byte offset 30: invalid "
        r"continuation byte\); save it as UTF-8",
    ),
    (
        "pipeline-is-a-file-collect",
        lambda t, tmp, out: collect(t, out, "--pipeline", str(t / "prompts.txt")),
        r"pipeline '.*prompts.txt' is a file; pass the pipeline folder",
    ),
    (
        "pipeline-without-unet-collect",
        lambda t, tmp, out: collect(t, out, "--pipeline", str(without_unet(t, tmp))),
        r"pipeline folder '.*no-unet' has no 'unet/' folder, which its model_index.json lists",
    ),
    (
        "pipeline-without-unet-generate",
        lambda t, tmp, out: generate(t, out, "--pipeline", str(without_unet(t, tmp))),
        r"pipeline folder '.*no-unet' has no 'unet/' folder",
    ),
    (
        "truncated-unet-weights-collect",
        lambda t, tmp, out: collect(t, out, "--pipeline", str(truncated_unet(t, tmp))),
        r"pipeline folder '.*truncated': 'unet/diffusion_pytorch_model.safetensors' is corrupt or "
        r"truncated",
    ),
    (
        "truncated-unet-weights-generate",
        lambda t, tmp, out: generate(t, out, "--pipeline", str(truncated_unet(t, tmp))),
        r"'unet/diffusion_pytorch_model.safetensors' is corrupt or truncated",
    ),
    (
        "output-dir-is-a-file",
        lambda t, tmp, out: collect(t, out / "earlier_results.txt"),
        r"'.*out/earlier_results.txt' is a file, not a folder; move it away or choose another "
        r"output_dir",
    ),
    (
        "output-dir-inside-a-file",
        lambda t, tmp, out: collect(t, out / "earlier_results.txt" / "run"),
        r"'.*out/earlier_results.txt' is a file, not a folder",
    ),
    pytest.param(
        lambda t, tmp, out: evaluate(t, out, "--device", "cuda"),
        r"device is 'cuda', but CUDA is not available on this machine; remove device or use cpu",
        id="device-cuda-without-cuda",
        marks=NO_CUDA,
    ),
    pytest.param(
        lambda t, tmp, out: evaluate(t, out, "--judge_kwargs", '{"shapes": {"device": "cuda:0"}}'),
        r"judge_kwargs.shapes.device is 'cuda:0', but CUDA is not available",
        id="judge-device-cuda-without-cuda",
        marks=NO_CUDA,
    ),
    # a judge's own ValueError for a bad kwarg value is a JudgeError naming the judge
    pytest.param(
        lambda t, tmp, out: collect(t, out, "--judge_kwargs", '{"overall": "bogus"}'),
        r"judge 'shapes' rejected its judge_kwargs",
        id="judge-rejects-a-kwarg-value",
    ),
]
PARAMS = [pytest.param(*c[1:], id=c[0]) if type(c) is tuple else c for c in CASES]


@pytest.mark.parametrize("make_argv, message", PARAMS)
def test_input_failure_is_one_line_and_exit_2(tiny, tmp_path, caplog, make_argv, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier_results.txt").write_text("results of an earlier run")
    argv = make_argv(tiny, tmp_path, out)
    before = snapshot(out)
    assert_one_line(*run_cli(argv, caplog), message)
    assert_earlier_files_unchanged(out, before)


# ---- a real read-only folder, a real full disk ------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """``mount(options) -> folder``: a fresh tmpfs, unmounted at the end (root only)."""
    mounted = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):  # lazy: datasets may still hold a shard memory-mapped
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_read_only_output_folder(tiny, tmpfs, caplog):
    out = tmpfs("size=1m")
    (out / "earlier_results.txt").write_text("results of an earlier run")
    remount = subprocess.run(
        ["mount", "-o", "remount,ro", str(out)], capture_output=True, text=True
    )
    if remount.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
    before = snapshot(out)
    status, errors = run_cli(collect(tiny, out), caplog)
    assert_one_line(
        status,
        errors,
        rf"'{re.escape(str(out))}/.*' is on a read-only file system; choose an output_dir on a "
        r"writable disk",
    )
    assert snapshot(out) == before  # nothing could be added either


def test_full_disk(tiny, tmpfs, caplog):
    disk = tmpfs("size=64k")  # holds the recipe and a shard, not the merged dataset
    (disk / "earlier_results.txt").write_text("results of an earlier run")
    before = snapshot(disk)
    status, errors = run_cli(collect(tiny, disk / "out", "--seeds", "0:4"), caplog)
    assert_one_line(
        status,
        errors,
        rf"no space left on the disk holding .*{re.escape(str(disk))}/out.*; free space or choose "
        r"an output_dir on another disk",
    )
    assert_earlier_files_unchanged(disk, before)


# ---- what the handler keeps for bugs and for NOISEALIGN_DEBUG=1 ---------------------------
def test_a_real_bug_keeps_its_traceback(tiny, tmp_path, caplog, monkeypatch):
    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr("noisealign.collect.collect_chunk", broken)
    with caplog.at_level(logging.ERROR, logger="noisealign"), pytest.raises(ZeroDivisionError):
        cli_main(collect(tiny, tmp_path / "out"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "make_argv, raised",
    [
        (lambda t, tmp: collect(t, tmp / "out", "--judge", "nope"), NoiseAlignError),
        (lambda t, tmp: collect(t, tmp / "out" / "earlier.txt" / "x"), OSError),
    ],
    ids=["user-error", "os-error"],
)
def test_debug_env_shows_every_traceback(tiny, tmp_path, monkeypatch, make_argv, raised):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.txt").write_text("x")
    monkeypatch.setenv("NOISEALIGN_DEBUG", "1")
    with pytest.raises(raised):
        cli_main(make_argv(tiny, tmp_path))


@pytest.mark.parametrize(
    "exc, line",
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            r"no space left on the disk holding output_dir 'o'",
        ),  # a write() names no file
        (
            RuntimeError(
                "Error while serializing: IoError(Os "
                '{ code: 28, kind: StorageFull, message: "No space left on device" })'
            ),
            r"no space left",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/p.txt"),
            r"permission denied for '/data/p.txt'",
        ),
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "/data"),
            r"'/data' is a folder where a file is expected",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file", "/given/in.txt"),
            r"'/given/in.txt' does not exist",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file", "o/shards/x"),
            None,
        ),  # the stage's own file: a bug
        (FileNotFoundError(errno.ENOENT, "No such file", "/elsewhere"), None),
        (
            AssertionError("Torch not compiled with CUDA enabled"),
            r"CUDA is not available on this machine",
        ),
        (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), r"byte offset 2"),
        (KeyboardInterrupt(), INTERRUPTED),
        (ValueError("a bug"), None),
    ],
    ids=[
        "enospc-no-file",
        "enospc-in-text",
        "eacces",
        "eisdir",
        "enoent-given",
        "enoent-own",
        "enoent-other",
        "cuda",
        "decode",
        "ctrl-c",
        "bug",
    ],
)
def test_explain_classes(exc, line):
    explained = explain(exc, ["--prompts", "/given/in.txt", "--output_dir", "o"])
    if line is None:
        assert explained is None
    else:
        assert explained[0] == (130 if isinstance(exc, KeyboardInterrupt) else 2)
        assert re.search(line, explained[1]), explained[1]


# ---- Ctrl-C and SIGTERM: exit 130 / 143, one line, and the rerun finishes -----------------
def _signal_when(proc: subprocess.Popen, ready, signum: int) -> str:
    """Send ``signum`` once ``ready()`` holds; the process's stderr."""
    deadline = time.time() + 240
    while not ready():
        assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()[-1500:]}"
        assert time.time() < deadline, "timed out waiting for the process"
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()[-1500:]}"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    return stderr


def _assert_interrupted(proc: subprocess.Popen, stderr: str, signum: int) -> None:
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], stderr[-2000:]
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(INTERRUPTED), stderr[-2000:]
    assert "Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_collect_interrupted_then_rerun_completes(tiny, tmp_path, signum):
    out = tmp_path / "out"
    # 8 steps an image (the builder's 2 would let the 11 chunks left after the first shard
    # finish before a loaded machine delivers the signal: a flaky exit 0 instead of 130)
    argv = collect(
        tiny,
        out,
        "--seeds",
        "0:6",
        "--chunk_size",
        "2",
        "--batch_size",
        "2",
        "--num_inference_steps",
        "8",
    )
    proc = _launch(argv)
    stderr = _signal_when(proc, lambda: any((out / "shards").glob("shard-*")), signum)
    _assert_interrupted(proc, stderr, signum)
    assert not (out / "dataset").exists()
    left = {k: v for k, v in snapshot(out).items() if k.startswith("shards/shard-")}
    assert left  # whole shards only: every one reads back
    for shard in (out / "shards").glob("shard-*"):
        assert datasets.load_from_disk(str(shard)).num_rows > 0

    cli_main(argv)  # the same command again
    assert {k: v for k, v in snapshot(out).items() if k in left} == left  # earlier shards untouched
    rows = datasets.load_from_disk(str(out / "dataset"))
    keys = list(zip(rows["prompt_id"], rows["seed"]))
    assert len(keys) == len(set(keys)) == 4 * 6


@pytest.mark.slow
def test_training_sigterm_then_resume_completes(tiny, tmp_path):
    out, steps = tmp_path / "out", 12
    argv = train_projector(
        tiny, out, "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "1"
    )
    proc = _launch(argv)
    stderr = _signal_when(
        proc,
        lambda: (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file(),
        signal.SIGTERM,
    )
    _assert_interrupted(proc, stderr, signal.SIGTERM)
    assert not (out / "model.safetensors").exists()
    saved = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert saved

    from noisealign import train_projector as stage

    resumed = stage.main(argv[1:] + ["--resume_from_checkpoint", "latest"])
    logged = [h["step"] for h in resumed.history]
    assert logged and min(logged) >= 3 and max(logged) == steps
    assert (out / "model.safetensors").is_file()
