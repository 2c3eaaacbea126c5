"""The limits of recipe fields: type checks and the ``min`` / ``max`` / ``choices`` / ``check``
metadata that :class:`noisealign.configs.BaseConfig` applies to every field, each failure as the
text that follows "recipe field 'name' ...".
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence
from typing import Any

from .errors import DataError

# metadata keys read by BaseConfig.__post_init__; argparse never sees them
LIMIT_KEYS = (
    "required",
    "min",
    "max",
    "min_exclusive",
    "max_exclusive",
    "multiple_of",
    "choices",
    "allow_inf",
    "check",
)


def matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, Sequence):
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def bounds(limits: typing.Mapping[str, Any]) -> str:
    """``"> 0"``, ``"in (0, 1]"``, ``">= 8 and a multiple of 8"``... or ``""`` without limits."""
    low, high = limits.get("min"), limits.get("max")
    if low is not None and high is not None:
        text = "in " + "[("[bool(limits.get("min_exclusive"))] + f"{low}, {high}"
        text += "])"[bool(limits.get("max_exclusive"))]
    elif low is not None:
        text = (">" if limits.get("min_exclusive") else ">=") + f" {low}"
    elif high is not None:
        text = ("<" if limits.get("max_exclusive") else "<=") + f" {high}"
    else:
        text = ""
    if limits.get("multiple_of"):
        text += (" and " if text else "") + f"a multiple of {limits['multiple_of']}"
    return text


def _number_problem(value: float, limits: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with one int or float value, as "must be ..."; ``None`` when it is fine."""
    allowed = bounds(limits)
    low, high = limits.get("min"), limits.get("max")
    inside = value == value  # NaN is in no range
    if low is not None:
        inside = inside and (value > low if limits.get("min_exclusive") else value >= low)
    if high is not None:
        inside = inside and (value < high if limits.get("max_exclusive") else value <= high)
    if limits.get("multiple_of") and inside and not math.isinf(value):
        inside = value % limits["multiple_of"] == 0
    if not inside:
        return f"must be {allowed or 'a finite number'}"
    if math.isinf(value) and not limits.get("allow_inf"):
        return "must be finite" + (f" and {allowed}" if allowed else "")
    return None


def field_problem(value: Any, limits: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with a field's (type-checked) value under its metadata limits, or ``None``."""
    if limits.get("required") and value in (None, "", [], {}):
        return "is required"
    if value is None:  # an unset optional field
        return None
    if "choices" in limits and value not in limits["choices"]:
        return f"must be one of {', '.join(map(repr, limits['choices']))}, got {value!r}"
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            problem = _number_problem(item, limits)
            if problem:
                return f"{problem}, got {item!r}"
    return limits["check"](value) if "check" in limits else None


def check_seeds(seeds: Any) -> str | None:
    """A ``"check"`` for seed fields: ``'start:stop'`` or ``'a,b,c'`` selecting at least one seed."""
    from .data.prompts import parse_seeds  # data.prompts imports the configs

    try:
        parse_seeds(seeds)
    except DataError as exc:
        return f"is not a usable seed list: {exc}"
    return None
