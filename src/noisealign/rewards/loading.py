"""Reward models by architecture name: build a fresh one, or load a folder (local or hub).

Weights load strictly (:func:`noisealign.nn.load_weights_strict`): every key must match, or
a one-line :class:`~noisealign.errors.DataError` names the folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from .. import dry_run
from ..errors import ConfigError, DataError, NoiseAlignError
from ..nn import read_config
from ..pipelines import check_compatible
from .model import NoiseRewardModel

WHAT = "reward model"


def _transformer() -> type[nn.Module]:
    return NoiseRewardModel


def _unet_lora() -> type[nn.Module]:
    from .unet_backbone import UNetRewardModel  # imports peft only when chosen

    return UNetRewardModel


# architecture name -> the model class, imported lazily; each class has ``config_class``.
ARCHITECTURES: dict[str, Callable[[], type[nn.Module]]] = {
    "transformer": _transformer,
    "unet_lora": _unet_lora,
}


def build_reward_model(name: str, **fields: Any) -> nn.Module:
    """A fresh reward model of architecture ``name`` from its config fields.

    Raises:
        ConfigError: unknown name or invalid fields.
    """
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"recipe field 'reward_model' is '{name}'; known reward models: "
            f"{', '.join(ARCHITECTURES)}"
        )
    cls = ARCHITECTURES[name]()
    try:
        config = cls.config_class(architecture=name, **fields)
    except TypeError as exc:
        raise ConfigError(f"recipe field 'model_kwargs' does not fit '{name}': {exc}") from exc
    return cls(config)


def _check_arguments(path_or_id: Any, expected_signature: Any) -> str:
    if isinstance(path_or_id, os.PathLike):
        path_or_id = os.fspath(path_or_id)
    if not isinstance(path_or_id, str) or not path_or_id:
        raise ConfigError(
            f"'path_or_id' is {path_or_id!r}; pass the reward model folder or hub id as a string"
        )
    if expected_signature is not None and not isinstance(expected_signature, dict):
        raise ConfigError(
            f"'expected_signature' is a {type(expected_signature).__name__}; pass "
            "pipeline_signature(pipe) or None"
        )
    return path_or_id


def load_reward_model(
    path_or_id: str, expected_signature: dict[str, Any] | None = None, **hub_kwargs: Any
) -> nn.Module:
    """Load any reward model folder by its ``architecture``; check it against a pipeline's
    signature.

    Example:
        >>> model = load_reward_model("reward_models/toy")  # doctest: +SKIP
    """
    path_or_id = _check_arguments(path_or_id, expected_signature)
    config = read_config(path_or_id, WHAT, **hub_kwargs)
    name = config.get("architecture")
    if name not in ARCHITECTURES:
        raise DataError(
            f"reward model '{path_or_id}' has architecture {name!r}; known: "
            f"{', '.join(ARCHITECTURES)}"
        )
    try:
        model = ARCHITECTURES[name]().from_pretrained(path_or_id, what=WHAT, **hub_kwargs)
    except NoiseAlignError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"reward model '{path_or_id}' cannot be built from its config ({exc}); save the "
            "model again"
        ) from exc
    if expected_signature is not None and model.config.pipeline_signature is not None:
        check_compatible(
            model.config.pipeline_signature, expected_signature, f"reward model '{path_or_id}'"
        )
    return dry_run.track("reward model", model)
