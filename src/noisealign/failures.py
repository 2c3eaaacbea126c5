"""Failures told in one line: which exceptions come from the user's input or environment, and
the line that names the path or field and the fix (:func:`explain`, used by
:func:`noisealign.cli.run_stage`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from safetensors import SafetensorError

from .errors import Interrupted, NoiseAlignError

INTERRUPTED = "interrupted; rerun the same command to resume"


def explain(exc: BaseException, args: Sequence[str] | None = None) -> tuple[int, str] | None:
    """``(exit status, one line)`` for a failure caused by input or environment; None for a bug.

    ``args`` (the stage's command line, ``sys.argv[1:]`` when None) tells which paths the user
    gave: a missing file is their mistake only when it is one of them or lies inside one.
    """
    if isinstance(exc, NoiseAlignError):
        return 2, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, INTERRUPTED
    if isinstance(exc, Interrupted):
        return 128 + exc.signum, INTERRUPTED
    args = list(sys.argv[1:] if args is None else args)
    line = _cuda_line(exc) or _os_line(exc, args) or _loading_line(exc) or _decode_line(exc)
    return (2, line) if line else None


# what torch says when a CUDA device is asked for without one: CPU build, no driver, no GPU
_NO_CUDA = re.compile(
    r"Torch not compiled with CUDA enabled|Found no NVIDIA driver|No CUDA GPUs are available"
    r"|no CUDA-capable device"
)
# pyarrow, safetensors (Rust) and some OSErrors carry the errno only in their text
_ERRNO_TEXT = {
    errno.ENOSPC: re.compile(r"No space left on device|os error 28\b"),
    errno.EDQUOT: re.compile(r"Disk quota exceeded|os error 122\b"),
    errno.EROFS: re.compile(r"Read-only file system|os error 30\b"),
}
# how diffusers / transformers report a missing or unreadable file of a model folder (a bare
# OSError)
_LOADING = re.compile(
    r"does not appear to have a file named|no file named|Unable to load weights"
    r"|is not a valid JSON file|Can't load"
)


def _cuda_line(exc: BaseException) -> str | None:
    if isinstance(exc, (AssertionError, RuntimeError)) and _NO_CUDA.search(str(exc)):
        return "CUDA is not available on this machine; remove device or use cpu"
    return None


def _errno(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    if isinstance(exc, (OSError, RuntimeError, SafetensorError)):
        return next((code for code, text in _ERRNO_TEXT.items() if text.search(str(exc))), None)
    return None


def _os_line(exc: BaseException, args: list[str]) -> str | None:
    """The line for a full, read-only or forbidden disk, or a path of the wrong kind."""
    code = _errno(exc)
    path = exc.filename if isinstance(exc, OSError) and exc.filename is not None else None
    where = f"'{path}'" if path is not None else _output_dir_phrase(args)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the disk holding {where}; free space or choose an output_dir on "
            "another disk"
        )
    if code == errno.EROFS:
        return f"{where} is on a read-only file system; choose an output_dir on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied for {where}; fix its permissions or choose another path"
    if path is None:
        return None
    if code == errno.ENOTDIR:
        blocker = next((p for p in Path(path).parents if p.exists() and not p.is_dir()), Path(path))
        return (
            f"'{blocker}' is a file, not a folder, so '{path}' cannot be used; move the file away "
            "or choose another path"
        )
    if code == errno.EISDIR:
        return f"'{path}' is a folder where a file is expected; pass a file"
    if code == errno.EEXIST and not Path(path).is_dir():
        return f"'{path}' is a file, not a folder; move it away or choose another output_dir"
    if code == errno.ENOENT and _given_by_user(path, args):
        return f"'{path}' does not exist; check the path in the recipe or on the command line"
    return None


def _loading_line(exc: BaseException) -> str | None:
    if isinstance(exc, SafetensorError):
        return (
            f"a safetensors weights file is corrupt or truncated ({_first_line(exc)}); re-save or "
            "re-download the model folder"
        )
    if isinstance(exc, OSError) and exc.errno is None and _LOADING.search(str(exc)):
        return (
            f"cannot load a model: {_first_line(exc)}; re-save or re-download the folder it names"
        )
    return None


def _decode_line(exc: BaseException) -> str | None:
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"a file is not {exc.encoding} text (byte offset {exc.start}: {exc.reason}); save it "
            "as UTF-8"
        )
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _given_values(args: list[str]) -> list[str]:
    """Every string on the command line and in its ``--config`` recipe (JSON values opened up)."""
    values: list = [_recipe(args)]
    for token in args:
        values.append(token.split("=", 1)[1] if token.startswith("--") and "=" in token else token)
    strings = []
    while values:
        value = values.pop()
        if isinstance(value, str) and value[:1] in ("{", "["):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        if isinstance(value, dict):
            values.extend([*value.keys(), *value.values()])
        elif isinstance(value, list):
            values.extend(value)
        elif isinstance(value, str) and value:
            strings.append(value)
    return strings


def _recipe(args: list[str]) -> dict:
    """The ``--config`` recipe as a mapping; empty without one or when it cannot be read."""
    if "--config" not in args[:-1]:
        return {}
    try:
        recipe = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _output_dir(args: list[str]) -> str | None:
    """The ``output_dir`` of the command line, else of the recipe."""
    for i, token in enumerate(args):
        if token.startswith("--output_dir="):
            return token.split("=", 1)[1]
        if token == "--output_dir" and i + 1 < len(args):
            return args[i + 1]
    folder = _recipe(args).get("output_dir")
    return str(folder) if folder is not None else None


def _output_dir_phrase(args: list[str]) -> str:
    folder = _output_dir(args)
    return f"output_dir '{folder}'" if folder else "the output folder"


def _given_by_user(path: str, args: list[str]) -> bool:
    """``path`` is a path the user gave, or lies inside a folder they gave other than output_dir
    (a file missing there is the stage's own doing)."""
    target = os.path.abspath(path)
    out = _output_dir(args)
    inside_out = out is not None and target.startswith(os.path.abspath(out) + os.sep)
    for value in _given_values(args):
        given = os.path.abspath(value)
        if target == given:
            return True
        if not inside_out and target.startswith(given + os.sep) and os.path.isdir(given):
            return True
    return False
