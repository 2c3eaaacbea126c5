"""Judges by name: a plain dict of lazy factories, extended by other packages.

Factories import their module only when called, so choosing the ``shapes`` judge never
imports a VLM. Other packages add judges through the ``noisealign.judges`` entry-point
group (``name = "pkg.module:factory"``); the factory takes the recipe's ``judge_kwargs``
and returns an object that follows :class:`~noisealign.judges.base.Judge`.

Example:
    >>> from noisealign.judges import build_judge
    >>> judge = build_judge("shapes")
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from .. import dry_run
from ..errors import JudgeError
from .base import Concept, Feedback, Judge, spans_to_token_scores
from .concepts import split_concepts

__all__ = [
    "JUDGES",
    "Concept",
    "Feedback",
    "Judge",
    "available_judges",
    "build_judge",
    "spans_to_token_scores",
    "split_concepts",
]

ENTRY_POINT_GROUP = "noisealign.judges"


def _shapes(**kwargs: Any) -> Judge:
    from ..toy.judge import ShapesJudge

    return ShapesJudge(**kwargs)


def _vlm(**kwargs: Any) -> Judge:
    from .vlm import VLMJudge

    return VLMJudge(**kwargs)


def _clip(**kwargs: Any) -> Judge:
    from .clip import CLIPJudge

    return CLIPJudge(**kwargs)


def _openai(**kwargs: Any) -> Judge:
    from .api import OpenAIJudge

    return OpenAIJudge(**kwargs)


JUDGES: dict[str, Callable[..., Judge]] = {
    "shapes": _shapes,  # the toy world's programmatic judge
    "vlm": _vlm,  # any transformers image-text-to-text VLM (Qwen2-VL, Qwen2.5-VL, LLaVA, ...)
    "clip": _clip,  # CLIP image-text similarity
    "openai": _openai,  # an OpenAI-compatible API with answer logprobs
}


def _plugin_judges() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_judges() -> list[str]:
    """Names of the built-in and installed judges."""
    return sorted(set(JUDGES) | set(_plugin_judges()))


def build_judge(name: str, **kwargs: Any) -> Judge:
    """Build the judge registered as ``name`` with the recipe's ``judge_kwargs``.

    Raises:
        JudgeError: the name is unknown (the message lists the known ones) or the factory
            rejected its arguments.
    """
    if name in JUDGES:
        factory = JUDGES[name]
    else:
        plugins = _plugin_judges()
        if name not in plugins:
            raise JudgeError(
                f"unknown judge '{name}'; known judges: {', '.join(available_judges())} "
                f"(install a package that registers it in the '{ENTRY_POINT_GROUP}' entry-point "
                "group)"
            )
        factory = plugins[name].load()
    try:
        judge = factory(**kwargs)
    except TypeError as exc:
        raise JudgeError(
            f"judge '{name}' does not accept judge_kwargs {sorted(kwargs)}: {exc}"
        ) from exc
    except (ValueError, OSError) as exc:  # a value the judge rejects, a model it cannot find
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JudgeError(f"judge '{name}' rejected its judge_kwargs: {first}; fix them") from exc
    return dry_run.track(f"judge {name}", judge)
