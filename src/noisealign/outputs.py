"""Output folders: never an input of the same run, never another stage's artefact, one writer.

Every stage calls :func:`check_output_dir_against_inputs` with its input fields before it
loads a model or writes anything: an ``output_dir`` that is, contains or lies inside one of
its inputs is refused (writing there replaces the input's files), and so is a folder that
holds another stage's artefact. Files of the kind the stage writes itself are overwritten
only when the folder is provably this stage's (its ``recipe.json``, or a trainer's
checkpoints) or with ``--overwrite_output_dir true``.

Before its first write a stage takes :func:`lock_output_dir` (through ``claim_output_dir``
or the trainers' ``check_output_dir``), so a second run on the same folder stops with
"another run holds ..." instead of deleting the first run's files.

Example:
    >>> check_output_dir_against_inputs("runs/p", {"reward_model": "org/hub-id"}, stage="generate")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import DataError

# what each stage leaves in its output_dir (names or glob patterns); any other artefact in
# ARTEFACTS found there was left by another stage
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "collect": ("recipe.json", "dataset", "shards"),
    "collect_npd": ("recipe.json", "dataset", "shards"),
    "image_npd": ("recipe.json", "dataset"),
    "distill": ("model.safetensors", "checkpoints"),
    "train_projector": ("model.safetensors", "checkpoints"),
    "train_npnet": ("model.safetensors", "checkpoints"),
    "evaluate": ("recipe.json", "report.md", "*.png"),
    "generate": ("*.png",),
}
ARTEFACTS: dict[str, str] = {
    "model_index.json": "a diffusers pipeline",
    "model.safetensors": "saved model weights",
    "dataset_info.json": "a saved dataset",
    "dataset": "a collected dataset",
    "shards": "collected shards",
    "checkpoints": "training checkpoints",
    "recipe.json": "another stage's recipe",
    "report.md": "an evaluation report",
    "*.png": "images",
}


def check_output_dir_against_inputs(
    output_dir: str | os.PathLike[str],
    inputs: Mapping[str, str | os.PathLike[str] | None],
    *,
    stage: str,
    overwrite: bool = False,
) -> None:
    """Refuse an ``output_dir`` that overlaps an input or holds files this run would clobber.

    ``inputs`` maps a field name to its value; empty values and hub ids (no such local path)
    are skipped. Raises :class:`DataError` with one line naming both fields and the fix.
    """
    out = Path(output_dir).expanduser().resolve()
    for name, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        if path == out:
            raise DataError(
                f"output_dir '{output_dir}' is the {name} folder; choose another output_dir"
            )
        if out.is_relative_to(path):
            raise DataError(
                f"output_dir '{output_dir}' lies inside the {name} folder '{value}'; choose an "
                "output_dir outside it"
            )
        if path.is_relative_to(out):
            raise DataError(
                f"output_dir '{output_dir}' contains the {name} '{value}'; choose an output_dir "
                "that does not"
            )
    if out.is_dir():
        _check_folder_contents(out, output_dir, stage, overwrite)


def _check_folder_contents(out: Path, output_dir, stage: str, overwrite: bool) -> None:
    own = STAGE_OUTPUTS[stage]
    if "recipe.json" in own and (out / "recipe.json").is_file():
        return  # claim_output_dir resumes the same recipe and names what differs in another
    found = {marker for marker in ARTEFACTS if any(out.glob(marker))}
    foreign = sorted(found - set(own))
    if foreign:
        what = ", ".join(f"{ARTEFACTS[m]} ({m})" for m in foreign)
        raise DataError(
            f"output_dir '{output_dir}' holds another stage's output: {what}; choose another "
            "output_dir"
        )
    # a trainer's folder is its own when it has complete checkpoints (then
    # checkpointing.check_output_dir asks for --resume_from_checkpoint or an overwrite)
    claimed = any(out.glob("checkpoints/checkpoint-*/trainer_state.json"))
    mine = sorted(found & set(own) - {"recipe.json", "checkpoints"})
    if mine and not claimed and not overwrite:
        raise DataError(
            f"output_dir '{output_dir}' already holds {', '.join(mine)} that no recipe.json or "
            "checkpoint of this stage accounts for; choose another output_dir or pass "
            "--overwrite_output_dir true"
        )


# ---- one writer per folder -------------------------------------------------------------
_HELD: dict[Path, FileLock] = {}  # one lock object per folder per process: flock is per open file


def lock_output_dir(output_dir: str | os.PathLike[str]) -> None:
    """Hold a lock on ``output_dir`` until this process exits; refuse a folder another run holds.

    Call it on the main process only, before the first write: the ranks of one launch share
    the folder, and they write only after a barrier that follows the main process's claim.
    The lock is ``.<name>.lock`` beside the folder, not inside it, so a run that fails after
    taking it leaves the folder as it was; the holder's pid is in ``.<name>.lock.pid`` (trying
    the lock reopens the lock file, which would clear a pid written inside). The operating
    system drops the lock when the holder dies, so a killed run never blocks the next one.
    """
    root = Path(output_dir).expanduser().resolve()
    if root in _HELD:  # the same process running a stage again (Python API, tests)
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_file = root.parent / f".{root.name}.lock"
    pid_file = lock_file.with_name(lock_file.name + ".pid")
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        pid = pid_file.read_text().strip() if pid_file.is_file() else "unknown"
        raise DataError(
            f"another run holds {output_dir} (pid {pid}); wait for it to finish or choose another "
            "output_dir"
        ) from None
    pid_file.write_text(f"{os.getpid()}\n")
    _HELD[root] = lock
