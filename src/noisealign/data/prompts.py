"""Prompt files: text, JSONL, CSV, or a ``datasets`` dataset saved on disk.

Each prompt becomes a :class:`PromptRecord`. Its ``prompt_id`` comes from an ``id`` /
``prompt_id`` column when the file has one, else from a hash of the prompt text, so ids
survive reordering and sharding. Optional concept annotations (a ``concepts`` column: a
list of ``{"text", "kind", "spans"}``; spans may be omitted and are then found in the prompt)
replace the rule-based splitter. GenEval metadata files (JSONL rows with an ``include`` list of
``{"class", "count", "color", "position"}``) get their concepts from ``include``; DrawBench's
CSV loads with ``column="Prompts"``.

Held-out prompts: rows whose ``split`` column is :data:`HELDOUT_SPLIT` (``"eval"``) are the
evaluation prompts. Training stages read prompt files with :func:`load_training_prompts`,
which leaves them out (a file without a ``split`` column is read whole), and record the
left-out ids beside what they write (:func:`save_heldout_record`), so a stage reading a
collected dataset can refuse rows of held-out prompts (:func:`check_not_heldout`).

Example:
    >>> records = load_prompts("prompts.txt")  # doctest: +SKIP
    >>> train = load_training_prompts("recipes/prompts/compositional.jsonl")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..judges.base import Concept
from .annotations import geneval_concepts, parse_concepts  # geneval_concepts: public here too

logger = logging.getLogger(__name__)

# The one definition of "held out", shared by every stage: a per-stage setting would let two
# stages of a chain disagree, which is exactly how evaluation prompts leak into training.
HELDOUT_SPLIT = "eval"
HELDOUT_FILE = "heldout.json"  # written by collect / collect_npd / image_npd beside dataset/
_RECORD_KEYS = {"prompts", "heldout_split", "heldout_prompt_ids"}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: a stable id, the text, optional concept annotations and its ``split`` value."""

    prompt_id: str
    prompt: str
    concepts: tuple[Concept, ...] | None = None
    split: str | None = None


def prompt_hash_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets  # heavy, and needed only for a saved dataset (the other files are text)

        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DataError(
                f"prompt folder '{path}' is not a dataset saved with save_to_disk"
            ) from exc
        if isinstance(dataset, datasets.DatasetDict):
            raise DataError(
                f"prompt dataset '{path}' has several splits; point to one split's folder"
            )
        return list(dataset)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"prompt file '{path}' is not UTF-8 text (line {line}, byte offset {exc.start}: "
            f"{exc.reason}); save it as UTF-8"
        ) from exc
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{n} is not valid JSON ({exc.msg}); one JSON object per line"
                    ) from exc
        return rows
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]


def load_prompts(
    path: str | Path,
    column: str = "prompt",
    split: str | None = None,
    column_field: str | None = "prompt_column",
) -> list[PromptRecord]:
    """Read prompts; raises :class:`DataError` when the file is missing, empty or lacks ``column``.

    With ``split``, only rows whose ``split`` column equals it are kept (e.g. the ``eval``
    rows of ``recipes/prompts/compositional.jsonl``). A prompt both in a held-out row and in
    another row is an error whatever ``split`` is.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"prompt file '{path}' does not exist; set 'prompts' to a .txt, .jsonl, .csv file or a "
            "saved dataset"
        )
    rows = _rows(path)
    if not rows:
        raise DataError(
            f"prompt file '{path}' holds no prompts; add one prompt per line (or per JSONL/CSV row)"
        )
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{n} is a JSON {type(row).__name__}, not an object; write one object per "
                'line, e.g. {"prompt": "a red cube"}, or one prompt per line in a .txt file'
            )
    if column not in rows[0]:
        fix = f"set '{column_field}'" if column_field else f"name the prompt column '{column}'"
        raise DataError(
            f"prompt file '{path}' has no '{column}' column (columns: {', '.join(rows[0])}); {fix}"
        )
    records = _records(rows, path, column)
    if split is not None:
        if "split" not in rows[0]:
            raise DataError(f"prompt file '{path}' has no 'split' column; remove the split setting")
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(f"prompt file '{path}' has no rows with split '{split}'")
    return records


def _records(rows: list[dict[str, Any]], path: Path, column: str) -> list[PromptRecord]:
    records: dict[str, PromptRecord] = {}
    held_out: dict[str, bool] = {}  # prompt text -> whether its rows are held out
    for n, row in enumerate(rows, 1):
        prompt = str(row[column] or "").strip()
        if not prompt:
            raise DataError(f"{path}: row {n} has an empty prompt; remove it or fill it in")
        prompt_id = str(row.get("prompt_id", row.get("id", "")) or prompt_hash_id(prompt))
        concepts = parse_concepts(row.get("concepts"), prompt, f"{path}: row {n}")
        if concepts is None and isinstance(row.get("include"), list):
            concepts = geneval_concepts(row["include"], prompt)
        split = None if row.get("split") in (None, "") else str(row["split"])
        if held_out.setdefault(prompt, split == HELDOUT_SPLIT) != (split == HELDOUT_SPLIT):
            raise DataError(
                f"{path}: row {n}: prompt '{prompt[:60]}' is both in a held-out row (split "
                f"'{HELDOUT_SPLIT}') and in a training row; remove one of the two"
            )
        record = PromptRecord(prompt_id, prompt, concepts, split)
        if prompt_id in records:
            if records[prompt_id].prompt != prompt:
                raise DataError(
                    f"{path}: prompt id '{prompt_id}' is used by two different prompts; make ids "
                    "unique"
                )
            logger.warning("%s: duplicate prompt '%s' skipped", path, prompt[:60])
            continue
        records[prompt_id] = record
    return list(records.values())


def load_training_prompts(
    path: str | Path, column: str = "prompt", column_field: str | None = "prompt_column"
) -> list[PromptRecord]:
    """The prompts a training stage reads: every row except the held-out ones (split ``eval``).

    A file without a ``split`` column is read whole (the toy world keeps its held-out prompts
    in a file of their own). A file of held-out rows only is a :class:`DataError`.
    """
    records = load_prompts(path, column, column_field=column_field)
    kept = [r for r in records if r.split != HELDOUT_SPLIT]
    if not kept:
        raise DataError(
            f"prompt file '{path}' holds only held-out prompts (split '{HELDOUT_SPLIT}'), which no "
            "training stage reads; set 'prompts' to a file with training rows"
        )
    if len(kept) < len(records):
        logger.info(
            "%s: %d held-out prompts (split '%s') left out of training, %d kept",
            path,
            len(records) - len(kept),
            HELDOUT_SPLIT,
            len(kept),
        )
    return kept


def load_heldout_prompts(path: str | Path, column: str = "prompt") -> list[PromptRecord]:
    """The evaluation prompts of a file: its held-out rows (split ``eval``), or every row of a
    file without a ``split`` column. A file with splits but no held-out row is a
    :class:`DataError`."""
    records = load_prompts(path, column)
    if all(r.split is None for r in records):
        return records
    held_out = [r for r in records if r.split == HELDOUT_SPLIT]
    if not held_out:
        raise DataError(
            f"prompt file '{path}' has a 'split' column but no held-out rows (split "
            f"'{HELDOUT_SPLIT}'); mark the evaluation prompts or choose the split to evaluate"
        )
    return held_out


def heldout_record(path: str | Path, column: str = "prompt") -> dict[str, Any]:
    """What a collecting stage records of its prompt file: the ids it left out as held out."""
    ids = sorted(r.prompt_id for r in load_prompts(path, column) if r.split == HELDOUT_SPLIT)
    return {"prompts": str(path), "heldout_split": HELDOUT_SPLIT, "heldout_prompt_ids": ids}


def save_heldout_record(folder: str | Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``folder/heldout.json`` (the output folder that holds ``dataset/``)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    Path(folder, HELDOUT_FILE).write_text(json.dumps(record, indent=2))


def load_heldout_record(dataset: str | Path) -> dict[str, Any] | None:
    """The record of a collected dataset: ``heldout.json`` in its folder or the folder above; None
    if absent."""
    for path in (Path(dataset, HELDOUT_FILE), Path(dataset).parent / HELDOUT_FILE):
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not _RECORD_KEYS <= record.keys():
                raise DataError(f"{path} is corrupt; collect the dataset again")
            return record
    return None


def check_not_heldout(dataset: str | Path, prompt_ids: Iterable[str]) -> dict[str, Any] | None:
    """Refuse a dataset with rows of prompts its collecting stage recorded as held out.

    A dataset without a record (collected before held-out prompts were left out, or built
    by hand) is read as it is, with a warning. Returns the record.
    """
    record = load_heldout_record(dataset)
    if record is None:
        logger.warning(
            "dataset '%s' records no held-out prompts (%s): every row is trained on; if its prompt "
            "file has rows with split '%s', collect it again",
            dataset,
            HELDOUT_FILE,
            HELDOUT_SPLIT,
        )
        return None
    leaked = sorted(set(prompt_ids) & set(record["heldout_prompt_ids"]))
    if leaked:
        raise DataError(
            f"dataset '{dataset}' holds rows of {len(leaked)} held-out prompt(s) (e.g. "
            f"'{leaked[0]}', "
            f"split '{record['heldout_split']}' of {record['prompts']}); collect it again into a "
            "fresh output_dir"
        )
    return record


def parse_seeds(seeds: str | list[int]) -> list[int]:
    """``"0:8"`` → 0..7, ``"1,5,9"`` → [1, 5, 9], a list stays a list; duplicates are an error."""
    if isinstance(seeds, list):
        values = [int(s) for s in seeds]
    elif ":" in seeds:
        start, _, stop = seeds.partition(":")
        try:
            values = list(range(int(start), int(stop)))
        except ValueError as exc:
            raise DataError(f"seeds '{seeds}' is not 'start:stop' with integers") from exc
    else:
        try:
            values = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError as exc:
            raise DataError(
                f"seeds '{seeds}' is not a comma-separated list of integers or 'start:stop'"
            ) from exc
    if not values:
        raise DataError(f"seeds '{seeds}' selects no seed; use e.g. '0:8' or [0, 1, 2]")
    if len(set(values)) != len(values):
        raise DataError(f"seeds '{seeds}' repeats a seed; each (prompt, seed) is collected once")
    return values
