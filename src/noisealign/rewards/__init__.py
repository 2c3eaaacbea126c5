"""Distilled reward models r_φ(ε, e): token-level and overall judge feedback from the noise.

Two architectures, chosen by name in the distill recipe (``reward_model: transformer``):

- ``transformer`` (:class:`~noisealign.rewards.model.NoiseRewardModel`): a small conv patch
  encoder plus token-to-patch transformer blocks; fast, a few hundred thousand parameters.
- ``unet_lora`` (:class:`~noisealign.rewards.unet_backbone.UNetRewardModel`): the diffusion
  UNet's down and mid blocks at t = T with LoRA adapters, reading token features from its
  cross-attention; heavier and usually stronger.

Example:
    >>> from noisealign.rewards import load_reward_model
    >>> model = load_reward_model("reward_models/toy")  # doctest: +SKIP
    >>> out = model(noise, emb.embeds, emb.mask)  # doctest: +SKIP
    >>> out.token_logits.shape, out.overall_logit.shape  # (B, L), (B,)  # doctest: +SKIP
"""

from __future__ import annotations

from .loading import ARCHITECTURES, build_reward_model, load_reward_model
from .model import NoiseRewardConfig, NoiseRewardModel, RewardModel, RewardOutput

__all__ = [
    "ARCHITECTURES",
    "NoiseRewardConfig",
    "NoiseRewardModel",
    "RewardModel",
    "RewardOutput",
    "build_reward_model",
    "load_reward_model",
]
