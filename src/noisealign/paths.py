"""Paths recorded inside a saved folder, read back from any working directory.

A policy folder's ``config.json`` records the pipeline it was trained with exactly as the
recipe wrote it (``pipeline: src/noisealign/toy/assets/pipeline``, a hub id, an absolute
path), so a folder shipped with relative paths stays portable. Read back, a relative path is
looked up, first match wins:

1. relative to the folder that records it (``"../pipeline"`` beside the folder);
2. relative to the current working directory;
3. relative to each folder above the recording one: a recipe run from the repository root
   records root-relative paths, and its output folder usually lies under that root;
4. otherwise it is a hub id, left as written.

A wrong match cannot go unnoticed: the policy also records the pipeline's signature, and
``check_pipeline`` refuses a pipeline that differs from it.

Example:
    >>> resolve_recorded_path("org/model", None)
    'org/model'
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def resolve_recorded_path(recorded: str, folder: str | os.PathLike[str] | None) -> str:
    """``recorded`` (a path or hub id saved in ``folder``'s config) as a path that opens from here.

    ``folder`` is the recording folder, or ``None`` / a hub id when it is not a local folder
    (then only the working directory is tried). Absolute paths and unmatched names (hub ids)
    come back unchanged.
    """
    path = Path(recorded).expanduser()
    if path.is_absolute():
        return str(path)
    home = Path(folder).resolve() if folder is not None and Path(folder).is_dir() else None
    if home is not None and (home / path).exists():
        return _found(home / path, recorded)
    if path.exists():
        return recorded
    for above in () if home is None else home.parents:
        if (above / path).exists():
            return _found(above / path, recorded)
    return recorded


def _found(path: Path, recorded: str) -> str:
    logger.info("recorded path '%s' resolved to %s", recorded, path)
    return str(path)
