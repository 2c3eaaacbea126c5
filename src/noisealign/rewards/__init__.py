"""Distilled reward models r_φ(ε, e): token-level and overall judge feedback from the noise alone.

Two architectures, chosen by name in the distill recipe (``reward_model: transformer``):

- ``transformer`` (:class:`~noisealign.rewards.model.NoiseRewardModel`): a small conv patch
  encoder plus token-to-patch transformer blocks; fast, a few hundred thousand parameters.
- ``unet_lora`` (:class:`~noisealign.rewards.unet_backbone.UNetRewardModel`): the diffusion
  UNet's down and mid blocks at t = T with LoRA adapters, reading token features from its
  cross-attention; heavier and usually stronger.

Example:
    >>> from noisealign.rewards import load_reward_model
    >>> model = load_reward_model("reward_models/toy")  # doctest: +SKIP
    >>> out = model(noise, emb.embeds, emb.mask)  # out.token_logits (B, L), out.overall_logit (B,)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError
from .loading import load_reward_model
from .model import NoiseRewardConfig, NoiseRewardModel, RewardModel, RewardOutput


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
            f"recipe field 'reward_model' is '{name}'; known reward models: {', '.join(ARCHITECTURES)}"
        )
    cls = ARCHITECTURES[name]()
    try:
        config = cls.config_class(architecture=name, **fields)
    except TypeError as exc:
        raise ConfigError(f"recipe field 'model_kwargs' does not fit '{name}': {exc}") from exc
    return cls(config)


__all__ = [
    "ARCHITECTURES",
    "NoiseRewardConfig",
    "NoiseRewardModel",
    "RewardModel",
    "RewardOutput",
    "build_reward_model",
    "load_reward_model",
]
