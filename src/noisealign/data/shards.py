"""Crash-safe sharded writing of collected rows into one ``datasets`` dataset.

Layout of an output folder::

    output_dir/
      recipe.json           the fingerprint of the recipe that wrote the rows
      shards/shard-<hash>/  one ``save_to_disk`` dataset per finished chunk of work
      dataset/              the merged, sorted dataset (``datasets.load_from_disk``)

A chunk is written to a temporary folder and renamed into ``shards/`` only when complete:
a rename is atomic, so a process killed at any moment leaves either a whole shard or
none. On restart the keys of the finished shards are skipped, so every key ends up in
exactly one shard. Chunks are cut from the ordered work list the same way whatever the
number of processes, which is what makes 1 and N processes write identical rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError
from ..outputs import lock_output_dir
from ..tracking import redact

logger = logging.getLogger(__name__)
datasets.disable_progress_bars()  # one bar per shard would drown the stage's own progress bar

Key = tuple[Hashable, ...]


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(fingerprint, sort_keys=True, default=str).encode()
    ).hexdigest()[:16]


def claim_output_dir(
    root: str | Path, fingerprint: dict[str, Any], overwrite: bool, derived: Sequence[Path] = ()
) -> None:
    """Record ``fingerprint`` in ``root/recipe.json``; refuse a folder claimed by a different recipe
    or held by another run (:func:`noisealign.outputs.lock_output_dir`).

    Outputs of the same recipe are resumed. A different recipe raises :class:`DataError`
    naming the settings that differ, unless ``overwrite``: then the ``derived`` paths (the
    other recipe's outputs) are deleted first.
    """
    root = Path(root)
    fingerprint = redact(fingerprint)  # a key in judge_kwargs never reaches recipe.json
    recipe_file = root / "recipe.json"
    if recipe_file.exists():
        try:
            previous = json.loads(recipe_file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{recipe_file} is corrupt; delete it or pass --overwrite_output_dir true"
            ) from exc
        if previous.get("fingerprint_hash") != fingerprint_hash(fingerprint):
            before = previous.get("fingerprint", {})
            changed = sorted(
                k for k in set(fingerprint) | set(before) if fingerprint.get(k) != before.get(k)
            )
            if not overwrite:
                raise DataError(
                    f"output_dir '{root}' holds outputs of a different recipe (differs in: "
                    f"{', '.join(changed)}); choose another output_dir or pass "
                    "--overwrite_output_dir true"
                )
            lock_output_dir(root)  # before deleting anything another run may be writing
            logger.warning(
                "overwriting outputs of a different recipe in %s (differs in: %s)",
                root,
                ", ".join(changed),
            )
            for path in derived:
                shutil.rmtree(path, ignore_errors=True)
    lock_output_dir(root)  # held until exit: a second run on root now stops here
    root.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint, "fingerprint_hash": fingerprint_hash(fingerprint)}
    tmp = recipe_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, recipe_file)


class ShardStore:
    """Shards of one recipe's rows under ``root``; see the module docstring."""

    def __init__(self, root: str | Path, key_columns: Sequence[str]) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.dataset_dir = self.root / "dataset"
        self.key_columns = tuple(key_columns)

    # -- set-up (main process only, before the others touch the folder) --------------
    def prepare(self, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Claim ``root`` for this recipe; refuse another recipe's rows unless ``overwrite``."""
        if not (self.root / "recipe.json").exists() and any(self.root.glob("shards/*")):
            raise DataError(
                f"output_dir '{self.root}' has shards but no recipe.json; choose another output_dir"
            )
        claim_output_dir(
            self.root, fingerprint, overwrite, derived=[self.shard_dir, self.dataset_dir]
        )
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        # chunks of a killed run, never renamed; no other run is writing: claim took the lock
        for stale in self.shard_dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- resume ---------------------------------------------------------------------
    def shards(self) -> list[Path]:
        return sorted(p for p in self.shard_dir.glob("shard-*") if p.is_dir())

    def done_keys(self) -> set[Key]:
        """Keys already in finished shards."""
        done: set[Key] = set()
        for shard in self.shards():
            table = datasets.load_from_disk(str(shard)).select_columns(list(self.key_columns))
            done.update(zip(*(table[c] for c in self.key_columns)))
        return done

    def plan(self, keys: Sequence[Key], chunk_size: int) -> list[list[Key]]:
        """Cut the keys not yet done into chunks, in order."""
        done = self.done_keys()
        todo = [k for k in keys if k not in done]
        return [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]

    # -- writing --------------------------------------------------------------------
    def write_shard(self, rows: list[dict[str, Any]], features: datasets.Features) -> Path:
        """Write one finished chunk atomically; its name is a hash of its keys."""
        keys = [tuple(row[c] for c in self.key_columns) for row in rows]
        name = "shard-" + hashlib.sha1(json.dumps(keys, default=str).encode()).hexdigest()[:16]
        final = self.shard_dir / name
        tmp = self.shard_dir / f".tmp-{name}-{os.getpid()}"
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp))
        os.rename(tmp, final)
        return final

    def merge(self, keys: Sequence[Key]) -> datasets.Dataset:
        """Concatenate the shards in ``keys`` order into ``dataset/``; check each key occurs
        once."""
        parts = [datasets.load_from_disk(str(s)) for s in self.shards()]
        if not parts:
            raise DataError(f"no shards in {self.shard_dir}; nothing was collected")
        merged = datasets.concatenate_datasets(parts)
        found = list(zip(*(merged[c] for c in self.key_columns)))
        position = {k: i for i, k in enumerate(found)}
        if len(position) != len(found):
            raise DataError(
                f"{self.shard_dir} holds duplicate keys; delete the output folder and collect again"
            )
        missing = [k for k in keys if k not in position]
        if missing:
            raise DataError(
                f"{len(missing)} keys were not collected (first: {missing[0]}); run the same "
                "command again"
            )
        return replace_dataset(merged.select([position[k] for k in keys]), self.dataset_dir)


def replace_dataset(dataset: datasets.Dataset, folder: str | Path) -> datasets.Dataset:
    """Write ``dataset`` to ``folder`` (``save_to_disk``), replacing what is there by renames.

    It is written beside the folder first, so a kill leaves the old dataset or the new one,
    never half of either. Returns the dataset loaded back from ``folder``.
    """
    folder = Path(folder)
    tmp, old = folder.parent / f".tmp-{folder.name}", folder.parent / f".old-{folder.name}"
    for stale in (tmp, old):  # left by a run killed between the renames below
        shutil.rmtree(stale, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return datasets.load_from_disk(str(folder))
