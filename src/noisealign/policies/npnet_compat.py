"""The official NPNet (Golden Noise, Zhou et al., arXiv 2411.09502), layer for layer.

:class:`NPNetCompat` (``policy_type="npnet_compat"``) is the released network, so the
official checkpoints load (:mod:`.npnet_convert`)::

    ε′ = svd(ε) + (2σ(α) − 1)·e + β·residual(ε + e),   e = AdaGroupNorm(ε, flatten(embeds))

It only takes 4 × ``resolution``² latents and exactly ``text_length`` tokens; it ignores
``mask`` and ``pooled`` (the official one does too) and does NOT keep ε′ Gaussian. The
improved NPNet is :class:`~noisealign.policies.npnet.NPNet`.

Example:
    >>> cfg = NPNetCompatConfig(resolution=8, text_dim=8, text_length=4, swin_embed_dim=12,
    ...                         swin_depths=[1, 1], swin_heads=[1, 2])  # doctest: +SKIP
    >>> NPNetCompat(cfg)(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8)).shape  # doctest: +SKIP
    torch.Size([2, 4, 8, 8])
"""

# no ``from __future__ import annotations``: PyTorchModelHubMixin reads the ``config`` annotation
from dataclasses import dataclass, field
from typing import Any

import einops
import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaGroupNorm
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import ConfigError
from ..nn import load_weights_strict
from .projector import check_inputs
from .swin import SwinResidual

HUB = dict(library_name="noisealign", repo_url="https://github.com/noisealign/noisealign")


def check_policy_type(config: Any, expected: str) -> None:
    """:class:`ConfigError` unless ``config.policy_type`` is ``expected``."""
    if config.policy_type != expected:
        raise ConfigError(f"field 'policy_type' must be '{expected}', got {config.policy_type!r}")


@dataclass
class NPNetCompatConfig:
    """The official NPNet's constructor arguments; defaults are the SDXL checkpoint's."""

    resolution: int = 128
    """Latent side (image size // 8)."""
    text_dim: int = 2048
    """D of the token embeddings (DiT: 1024)."""
    text_length: int = 77
    """L; the tokens are flattened."""
    swin_embed_dim: int = 96
    """Swin-T: 96 (smaller only in tests)."""
    swin_depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    """Swin-T blocks per stage."""
    swin_heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24])
    """Swin-T heads per stage."""
    swin_drop_path: float = 0.1
    """timm's default stochastic depth; train mode only."""
    pipeline_signature: dict[str, Any] | None = None
    """noisealign.pipelines.pipeline_signature of the pipeline."""
    pipeline: str | None = None
    """Folder or hub id of that pipeline."""
    policy_type: str = "npnet_compat"
    """Key in noisealign.policies.POLICIES."""

    def __post_init__(self) -> None:
        check_policy_type(self, "npnet_compat")
        for name in ("resolution", "text_dim", "text_length", "swin_embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"npnet_compat field '{name}' must be >= 1, got {getattr(self, name)}"
                )


class SVDAttention(nn.Module):
    """timm-style self-attention: fused qkv without bias, 8 heads, output projection."""

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class SVDBranch(nn.Module):
    """Official ``SVDNoiseUnet``: predicts the singular values of the 2×2-tiled latent matrix."""

    def __init__(self, resolution: int) -> None:
        super().__init__()
        n = resolution * 2  # 4 channels tiled 2×2: an n × n matrix
        self.mlp1 = nn.Sequential(nn.Linear(n, 64), nn.ReLU(), nn.Linear(64, n))
        self.mlp2 = nn.Sequential(nn.Linear(n, 64), nn.ReLU(), nn.Linear(64, n))
        self.mlp3 = nn.Sequential(nn.Linear(n, n))
        self.attention = SVDAttention(n)
        self.bn = nn.BatchNorm2d(n)  # unused by the official forward; kept so its keys load
        self.mlp4 = nn.Sequential(nn.Linear(n, 1024), nn.ReLU(), nn.Linear(1024, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = einops.rearrange(x, "b (a c) h w -> b (a h) (c w)", a=2, c=2)
        u, s, vh = (t.to(x.dtype) for t in torch.linalg.svd(x.float()))
        out = self.mlp1(u.transpose(1, 2)) + self.mlp2(vh) + self.mlp3(s).unsqueeze(1)
        out = self.mlp4(self.attention(out).mean(1)) + s
        pred = u @ torch.diag_embed(out) @ vh
        return einops.rearrange(pred, "b (a h) (c w) -> b (a c) h w", a=2, c=2)


class NPNetCompat(nn.Module, PyTorchModelHubMixin, tags=["noisealign", "npnet"], **HUB):
    """The official NPNet; ``(B, 4, R, R)`` noise, ``(B, 77, D)`` embeds → ``(B, 4, R, R)``."""

    config_class = NPNetCompatConfig
    _from_pretrained = classmethod(load_weights_strict)  # every key must match

    def __init__(self, config: NPNetCompatConfig) -> None:
        super().__init__()
        self.config = config
        self.unet_svd = SVDBranch(config.resolution)
        self.unet_embedding = SwinResidual(
            config.resolution,
            config.swin_embed_dim,
            config.swin_depths,
            config.swin_heads,
            config.swin_drop_path,
        )
        self.text_embedding = AdaGroupNorm(config.text_dim * config.text_length, 4, 1, eps=1e-6)
        self.alpha = nn.Parameter(torch.zeros(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε′; ``mask`` and ``pooled`` are accepted for the common interface and ignored."""
        cfg = self.config
        check_inputs(noise, embeds, 4, cfg.text_dim)
        if (
            noise.shape[2:] != (cfg.resolution, cfg.resolution)
            or embeds.shape[1] != cfg.text_length
        ):
            raise ValueError(
                f"npnet_compat takes noise (B, 4, {cfg.resolution}, {cfg.resolution}) and embeds "
                f"(B, {cfg.text_length}, {cfg.text_dim}), got {tuple(noise.shape)} and "
                f"{tuple(embeds.shape)}; use its own image size, or policy_type 'npnet' for others"
            )
        dtype = self.alpha.dtype
        x = noise.to(dtype)
        text = self.text_embedding(x, embeds.to(dtype).reshape(x.shape[0], -1))
        out = (
            self.unet_svd(x)
            + (2 * torch.sigmoid(self.alpha) - 1) * text
            + self.beta * self.unet_embedding(x + text)
        )
        return out.to(noise.dtype)
