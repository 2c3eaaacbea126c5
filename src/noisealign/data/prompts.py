"""Prompt files: text, JSONL, CSV, or a ``datasets`` dataset saved on disk.

Each prompt becomes a :class:`PromptRecord`. Its ``prompt_id`` comes from an ``id`` /
``prompt_id`` column when the file has one, else from a hash of the prompt text, so ids
survive reordering and sharding. Optional concept annotations (a ``concepts`` column: a
list of ``{"text", "kind", "spans"}``; spans may be omitted and are then found in the prompt)
replace the rule-based splitter. GenEval metadata files (JSONL rows with an ``include`` list of
``{"class", "count", "color", "position"}``) get their concepts from ``include``; DrawBench's
CSV loads with ``column="Prompts"``.

Example:
    >>> records = load_prompts("prompts.txt")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..judges.base import Concept

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: a stable id, the text, and optional concept annotations."""

    prompt_id: str
    prompt: str
    concepts: tuple[Concept, ...] | None = None


def prompt_hash_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


def _concepts(raw: Any, prompt: str, where: str) -> tuple[Concept, ...] | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, str):
        raw = json.loads(raw)
    concepts = []
    for item in raw:
        if isinstance(item, str):
            item = {"text": item}
        concept = Concept.from_dict(item)
        if not concept.spans:
            start = prompt.lower().find(concept.text.lower())
            if start < 0:
                raise DataError(
                    f"{where}: concept '{concept.text}' does not occur in the prompt; give its spans explicitly"
                )
            concept.spans = [(start, start + len(concept.text))]
        concepts.append(concept)
    return tuple(concepts)


_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def _find(prompt: str, words: Sequence[str], start: int = 0) -> tuple[int, int] | None:
    """Span of the first of ``words`` found in ``prompt`` (whole words, case-insensitive)."""
    for word in words:
        match = re.search(rf"\b{re.escape(word)}\b", prompt[start:], re.IGNORECASE)
        if match:
            return start + match.start(), start + match.end()
    return None


def geneval_concepts(include: list[dict], prompt: str) -> tuple[Concept, ...]:
    """Concepts from a GenEval ``include`` list: objects, colours, counts and positions.

    Each concept's span is found in the prompt (plural forms too); one that cannot be found
    spans the whole prompt, so its score still reaches the prompt's tokens.
    """
    whole = [(0, len(prompt))]
    concepts, objects = [], []
    for item in include:
        name = str(item["class"])
        span = _find(prompt, [name, name + "s", name + "es"])
        objects.append((name, span))
        concepts.append(Concept(name, "object", [span] if span else whole))
        if item.get("color"):
            color = _find(prompt, [item["color"]])
            concepts.append(Concept(f"{item['color']} {name}", "attribute", [color] if color else whole))  # fmt: skip
        count = int(item.get("count", 1))
        if count > 1:
            where = _find(prompt, [_NUMBERS.get(count, str(count)), str(count)])
            concepts.append(Concept(f"{count} {name}", "count", [where] if where else whole))
        if item.get("position"):
            relation, other = item["position"][0], int(item["position"][1])
            where = _find(prompt, [relation])
            text = f"{name} {relation} {objects[other][0] if other < len(objects) else '?'}"
            concepts.append(Concept(text, "relation", [where] if where else whole))
    return tuple(concepts)


def _rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if path.is_dir():
        import datasets

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
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{path}:{n} is not valid JSON ({exc.msg}); one JSON object per line"
                    ) from exc
        return rows
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    return [
        {"prompt": line.strip()}
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def load_prompts(
    path: str | Path, column: str = "prompt", split: str | None = None
) -> list[PromptRecord]:
    """Read prompts; raises :class:`DataError` when the file is missing, empty or lacks ``column``.

    With ``split``, only rows whose ``split`` column equals it are kept (e.g. the ``eval``
    rows of ``recipes/prompts/compositional.jsonl``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"prompt file '{path}' does not exist; set 'prompts' to a .txt, .jsonl, .csv file or a saved dataset"
        )
    rows = _rows(path)
    if not rows:
        raise DataError(
            f"prompt file '{path}' holds no prompts; add one prompt per line (or per JSONL/CSV row)"
        )
    if column not in rows[0]:
        raise DataError(
            f"prompt file '{path}' has no '{column}' column (columns: {', '.join(rows[0])}); set 'prompt_column'"
        )
    if split is not None:
        if "split" not in rows[0]:
            raise DataError(f"prompt file '{path}' has no 'split' column; remove the split setting")
        rows = [row for row in rows if row["split"] == split]
        if not rows:
            raise DataError(f"prompt file '{path}' has no rows with split '{split}'")
    records: dict[str, PromptRecord] = {}
    for n, row in enumerate(rows, 1):
        prompt = str(row[column] or "").strip()
        if not prompt:
            raise DataError(f"{path}: row {n} has an empty prompt; remove it or fill it in")
        prompt_id = str(row.get("prompt_id", row.get("id", "")) or prompt_hash_id(prompt))
        concepts = _concepts(row.get("concepts"), prompt, f"{path}: row {n}")
        if concepts is None and isinstance(row.get("include"), list):
            concepts = geneval_concepts(row["include"], prompt)
        record = PromptRecord(prompt_id, prompt, concepts)
        if prompt_id in records:
            if records[prompt_id].prompt != prompt:
                raise DataError(
                    f"{path}: prompt id '{prompt_id}' is used by two different prompts; make ids unique"
                )
            logger.warning("%s: duplicate prompt '%s' skipped", path, prompt[:60])
            continue
        records[prompt_id] = record
    return list(records.values())


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
