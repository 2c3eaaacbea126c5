"""The distilled reward model r_φ(ε, e): a judge's token-level and overall feedback from the noise.

Architecture (docs/distill.md): a conv patch encoder turns the noise (B, C, H, W) into
patches with fixed 2-D sine-cosine positions (so any latent size works); a learned [CLS]
token and the projected prompt tokens then run through ``depth`` blocks in which tokens
attend to each other (masked) and to the noise patches; a per-token head reads the tokens
and an overall head reads [CLS]. SDXL's pooled embedding is added to [CLS].

Example:
    >>> cfg = NoiseRewardConfig(latent_channels=4, text_dim=32, hidden_dim=32, depth=1)
    >>> model = NoiseRewardModel(cfg)
    >>> out = model(torch.randn(2, 4, 16, 16), torch.randn(2, 8, 32))
    >>> tuple(out.token_logits.shape), tuple(out.overall_logit.shape)
    ((2, 8), (2,))
"""

# no ``from __future__ import annotations``: PyTorchModelHubMixin reads the ``config`` annotation
# at class creation to rebuild the dataclass from config.json
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..distillation.card import CARD_TEMPLATE
from ..errors import ConfigError
from ..nn import (
    AttentionBlock,
    NoiseInputs,
    PatchEmbed,
    check_pooled,
    check_sizes,
    encoder_layer,
    load_weights_strict,
    norm_linear,
)

INPUT_KINDS = ("latent", "x0")


class RewardOutput(NamedTuple):
    """``token_logits`` (B, L) and ``overall_logit`` (B,): float32 logits of P(judge says yes)."""

    token_logits: torch.Tensor
    overall_logit: torch.Tensor


class RewardModel(Protocol):
    """What the distill trainer and the policies need from a reward model.

    ``noise``: (B, C, H, W) float, the initial noise or its k-step features (see ``input_steps``);
    ``embeds``: (B, L, D) per-token prompt embeddings; ``mask``: (B, L) bool, True for real
    tokens; ``pooled``: (B, P) or None.
    """

    def __call__(
        self,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> RewardOutput: ...


@dataclass
class NoiseRewardConfig(NoiseInputs):
    """Size and inputs of :class:`NoiseRewardModel`; saved as the folder's ``config.json``."""

    architecture: str = "transformer"
    """Always 'transformer'."""
    hidden_dim: int = 128
    """Width of the transformer."""
    depth: int = 3
    """Token-to-patch transformer blocks."""
    patch_layers: int = 1
    """Self-attention layers over patches."""
    num_heads: int = 4
    """Attention heads."""
    patch_size: int = 2
    """Latent pixels per patch side."""
    noise_pool: int = 1
    """Average-pool the input by this factor (scaled to keep unit variance) before the patch
    encoder: only the coarse noise structure that decides layouts is seen (1 = off)."""
    mlp_ratio: float = 4.0
    """MLP width / hidden_dim."""
    dropout: float = 0.0
    """Dropout in attention and MLPs."""
    input_steps: int = 0
    """k: DDIM steps run on the noise before scoring (0 = the noise itself)."""
    input_kind: str = "latent"
    """For k > 0: 'latent' feeds x_{T-k}, 'x0' the predicted clean latent."""
    num_inference_steps: int = 0
    """Schedule length of the k steps (the collect recipe's)."""
    guidance_scale: float = 0.0
    """CFG scale of the k steps."""
    pipeline_signature: dict[str, Any] | None = None
    """noisealign.pipelines.pipeline_signature of the training pipeline."""

    def __post_init__(self) -> None:
        if self.architecture != "transformer":
            raise ConfigError(
                f"reward model config has architecture '{self.architecture}', not 'transformer'; "
                "load it with noisealign.rewards.load_reward_model"
            )
        names = ("latent_channels", "text_dim", "hidden_dim", "depth", "num_heads")
        check_sizes(self, "reward model", (*names, "patch_size", "noise_pool"))
        check_input_fields(self.input_steps, self.input_kind, self.num_inference_steps)


def check_input_fields(steps: int, kind: str, num_inference_steps: int) -> None:
    """Validate the k-step input fields shared by both reward model configs."""
    if steps < 0:
        raise ConfigError(f"reward model field 'input_steps' must be >= 0, got {steps}")
    if kind not in INPUT_KINDS:
        raise ConfigError(
            f"reward model field 'input_kind' must be one of {INPUT_KINDS}, got {kind!r}"
        )
    if steps > 0 and num_inference_steps < steps:
        raise ConfigError(
            f"reward model field 'num_inference_steps' ({num_inference_steps}) must be >= "
            f"input_steps ({steps})"
        )


class NoiseRewardModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="noisealign",
    repo_url="https://github.com/noisealign/noisealign",
    tags=["noisealign", "reward-model", "diffusion-noise"],
    model_card_template=CARD_TEMPLATE,
):
    """r_φ(ε, e) → (token logits (B, L), overall logit (B,)); see the module docstring."""

    config_class = NoiseRewardConfig
    # FSDP shard groups (accelerate's TRANSFORMER_BASED_WRAP reads this); the rest joins the root's
    _no_split_modules = ["AttentionBlock"]
    _from_pretrained = classmethod(load_weights_strict)  # every key must match

    def __init__(self, config: NoiseRewardConfig) -> None:
        super().__init__()
        self.config = config
        dim, heads, ratio, dropout = (
            config.hidden_dim,
            config.num_heads,
            config.mlp_ratio,
            config.dropout,
        )
        self.patch_embed = PatchEmbed(config.latent_channels, dim, config.patch_size)
        self.patch_encoder = nn.ModuleList(
            encoder_layer(dim, heads, int(dim * ratio), dropout) for _ in range(config.patch_layers)
        )
        self.token_in = norm_linear(config.text_dim, dim)
        self.pooled_in = None if config.pooled_dim is None else nn.Linear(config.pooled_dim, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            AttentionBlock(dim, heads, ratio, dropout, norm_context=True)
            for _ in range(config.depth)
        )
        self.token_head = norm_linear(dim, 1)
        self.overall_head = norm_linear(dim, 1)

    def encode_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, N, hidden) patches with positions; pads H, W up to the pool and the
        patch size."""
        pool = self.config.noise_pool
        if pool > 1:  # the mean of pool² unit-variance values, times pool: unit variance again
            pad_h, pad_w = (-noise.shape[2]) % pool, (-noise.shape[3]) % pool
            if pad_h or pad_w:
                noise = F.pad(noise, (0, pad_w, 0, pad_h))
            noise = F.avg_pool2d(noise, pool) * pool
        patches, _ = self.patch_embed(noise)
        for layer in self.patch_encoder:
            patches = layer(patches)
        return patches

    def forward(
        self,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> RewardOutput:
        """Score ``noise`` (B, C, H, W) for prompts ``embeds`` (B, L, D) with ``mask`` (B, L) and
        ``pooled`` (B, P)."""
        cfg = self.config
        if noise.ndim != 4 or noise.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"noise must be (B, {cfg.latent_channels}, H, W), got {tuple(noise.shape)}"
            )
        if embeds.ndim != 3 or embeds.shape[2] != cfg.text_dim:
            raise ValueError(f"embeds must be (B, L, {cfg.text_dim}), got {tuple(embeds.shape)}")
        check_pooled(pooled, self.pooled_in, "reward model")
        batch, length = embeds.shape[:2]
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        patches = self.encode_noise(noise)
        cls = self.cls.expand(batch, -1, -1)
        if self.pooled_in is not None:
            cls = cls + self.pooled_in(pooled)[:, None]
        tokens = torch.cat([cls, self.token_in(embeds)], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask.bool()], dim=1)
        for block in self.blocks:
            tokens = block(tokens, patches, pad)
        token_logits = self.token_head(tokens[:, 1:]).squeeze(-1)
        overall_logit = self.overall_head(tokens[:, 0]).squeeze(-1)
        return RewardOutput(token_logits.float(), overall_logit.float())
