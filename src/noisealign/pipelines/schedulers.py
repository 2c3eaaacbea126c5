"""The samplers a recipe chooses by name (``scheduler``, ``scheduler_kwargs``), swapped into a
loaded pipeline with ``from_config``.

``Class.from_config(pipe.scheduler.config, **defaults, **scheduler_kwargs)`` keeps the noise
schedule, timestep spacing, offset and prediction type the model was trained with. diffusers
also keeps the keys the new class does not use in its config, so
``DDIMScheduler.from_config(pipe.scheduler.config)`` (how the hand-written DDIM steps of the
reward features, re-denoise sampling and the search baselines build theirs) gives back the
model's own DDIM whatever sampler the pipeline holds; ``scheduler_kwargs`` keys that DDIM shares
(``timestep_spacing``...) reach those steps too.

Example:
    >>> set_scheduler(pipe, "euler")  # doctest: +SKIP
    >>> set_scheduler(pipe, "dpmsolver++", {"use_karras_sigmas": True})  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from ..errors import ConfigError, PipelineError


@dataclass(frozen=True)
class Sampler:
    """A diffusers scheduler class, the arguments it is always built with, and its family."""

    cls: type
    defaults: dict[str, Any] = field(default_factory=dict)
    flow_matching: bool = False


DEFAULT_SCHEDULER = "ddim"
# load_pipeline's default: the adapter's default_scheduler (DDIM for SD / SDXL, flow_euler for
# SD3 and FLUX), so a stage that names no sampler loads either family; not a recipe choice
FAMILY_DEFAULT = "default"
SCHEDULERS: dict[str, Sampler] = {
    # eta = 0: deterministic, and the sampler the inversion helpers invert
    "ddim": Sampler(DDIMScheduler),
    "euler": Sampler(EulerDiscreteScheduler),
    "dpmsolver++": Sampler(DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    # adds fresh noise between steps; sampling.generate seeds it per image
    "lcm": Sampler(LCMScheduler),
    "flow_euler": Sampler(FlowMatchEulerDiscreteScheduler, flow_matching=True),
}
# a pipeline holding one of these was trained for flow matching; by name, because
# model_index.json names the class before any weight loads
FLOW_MATCHING_CLASSES = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
)


def kwargs_problem(name: str, kwargs: dict) -> str | None:
    """What is wrong with ``scheduler_kwargs`` for scheduler ``name`` (keys its class's
    ``__init__`` does not take), as the text after "scheduler_kwargs"; ``None`` if nothing."""
    cls = SCHEDULERS[name].cls
    # the class's own signature: diffusers' from_config would silently drop any other key
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if not unknown:
        return None
    return (
        f"has {', '.join(map(repr, unknown))}, which {cls.__name__} (scheduler '{name}') does not "
        f"accept; it accepts {', '.join(sorted(accepted))}"
    )


def check_recipe_fields(scheduler: str, scheduler_kwargs: dict) -> None:
    """:class:`ConfigError` for ``scheduler_kwargs`` that ``scheduler``'s class does not take
    (the name itself is checked by the field's ``choices``)."""
    problem = kwargs_problem(scheduler, scheduler_kwargs)
    if problem:
        raise ConfigError(
            f"recipe field 'scheduler_kwargs' {problem}; fix it in the YAML or on the command line"
        )


def drop_default_sampler(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """An output folder's ``fingerprint`` without its ``scheduler`` / ``scheduler_kwargs`` when
    they are plain DDIM, so folders written before the fields existed still resume."""
    if fingerprint["scheduler"] == DEFAULT_SCHEDULER and not fingerprint["scheduler_kwargs"]:
        return {k: v for k, v in fingerprint.items() if k not in ("scheduler", "scheduler_kwargs")}
    return fingerprint


def check_fits(name: str, current: str, pipeline: str) -> None:
    """:class:`PipelineError` unless sampler ``name`` is of the family of ``current``, the class
    name of the scheduler pipeline ``pipeline`` ships with (DDPM-family or flow matching)."""
    if name not in SCHEDULERS:
        raise PipelineError(f"unknown scheduler '{name}'; use one of {', '.join(SCHEDULERS)}")
    flow = current in FLOW_MATCHING_CLASSES
    if SCHEDULERS[name].flow_matching == flow:
        return
    family = "flow-matching" if flow else "DDPM-family"
    fitting = [n for n, s in SCHEDULERS.items() if s.flow_matching == flow]
    raise PipelineError(
        f"scheduler '{name}' does not fit pipeline '{pipeline}': its scheduler {current} is "
        f"{family}, so use one of {', '.join(fitting)}"
    )


def set_scheduler(
    pipe: Any, name: str = DEFAULT_SCHEDULER, kwargs: dict | None = None, pipeline: str = ""
) -> None:
    """Put sampler ``name`` in ``pipe.scheduler``, built from the pipeline's scheduler config.

    A scheduler that already is the class (and no ``kwargs``) is left as loaded, so the default
    DDIM output stays the one it always was. ``pipeline`` names the model in error messages.

    Raises:
        PipelineError: an unknown name, a sampler of the other family (:func:`check_fits`),
            ``kwargs`` the class does not take, or values it refuses.
    """
    kwargs = dict(kwargs or {})
    current = type(pipe.scheduler).__name__
    check_fits(name, current, pipeline or type(pipe).__name__)
    problem = kwargs_problem(name, kwargs)
    if problem:
        raise PipelineError(f"scheduler_kwargs {problem}")
    sampler = SCHEDULERS[name]
    wanted = {**sampler.defaults, **kwargs}
    if isinstance(pipe.scheduler, sampler.cls) and all(
        pipe.scheduler.config.get(k) == v for k, v in wanted.items()
    ):
        return
    try:
        scheduler = sampler.cls.from_config(pipe.scheduler.config, **wanted)
        scheduler.set_timesteps(2)  # a value only a schedule refuses fails here, not mid-run
    except (ValueError, TypeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(
            f"cannot build {sampler.cls.__name__} (scheduler '{name}') with scheduler_kwargs "
            f"{kwargs}: {first}"
        ) from exc
    pipe.scheduler = scheduler


def stepping_class(pipe: Any) -> type:
    """The sampler of the hand-written steps (:mod:`noisealign.pipelines.steps`): DDIM for a
    DDPM-family model, flow-matching Euler for SD3 / FLUX."""
    flow = type(pipe.scheduler).__name__ in FLOW_MATCHING_CLASSES
    return FlowMatchEulerDiscreteScheduler if flow else DDIMScheduler


@contextmanager
def stepping_sampler(pipe: Any) -> Iterator[None]:
    """Inside the block ``pipe()`` runs :func:`stepping_class`'s sampler, built from the
    pipeline's scheduler config unless the pipeline already holds it; the pipeline's own
    scheduler is put back on exit."""
    original, cls = pipe.scheduler, stepping_class(pipe)
    if type(original) is not cls:
        pipe.scheduler = cls.from_config(original.config)
    try:
        yield
    finally:
        pipe.scheduler = original
