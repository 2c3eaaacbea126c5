"""NPNet (Golden Noise, Zhou et al., arXiv 2411.09502): the official network and an improved one.

Both map ``noise (B, C, H, W), embeds (B, L, D), mask (B, L), pooled (B, P)`` to ε′ of noise's
shape and dtype, like :class:`~noisealign.policies.NoiseProjector`, and save as a folder.

:class:`NPNetCompat` (``policy_type="npnet_compat"``, in :mod:`.npnet_compat`, imported here
too) is the released network layer for layer, so the official checkpoints load; it takes only
the official sizes and does NOT keep ε′ Gaussian.

:class:`NPNet` (``policy_type="npnet"``) keeps the two branches and fixes the flaws:

- *spectral branch*: per channel, ε_c = U diag(s) Vᵀ (any H × W); each singular value is a
  token (its value, its relative rank, its channel) that attends to the other singular values
  and to that sample's own prompt tokens (padding masked); a zero-initialised head predicts
  Δs, giving ``U diag(Δs) Vᵀ``. U and V are kept, as the paper observes they barely change.
- *residual branch*: conv patch encoder + patch self-attention + cross-attention to the
  prompt tokens (the blocks of the noise projector) instead of Swin-T on a 224² upsample and
  8 prompt scalars; a zero-initialised head.
- SDXL's pooled embedding modulates both branches FiLM-style; no DropPath, no hub download.
- ``ε′ = moment_match(ε, r_spectral + r_residual)`` (``moment_match=True``, the default): ε′
  has ε's per-sample mean and std, and is ε bit for bit at initialisation.

Example:
    >>> cfg = NPNetConfig(latent_channels=4, text_dim=64, hidden_dim=32, depth=1, num_heads=2)
    >>> eps = torch.randn(2, 4, 16, 16)
    >>> bool(torch.equal(NPNet(cfg).eval()(eps, torch.randn(2, 16, 64)), eps))
    True
"""

# no ``from __future__ import annotations``: PyTorchModelHubMixin reads the ``config`` annotation
import math
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..nn import (
    AttentionBlock,
    NoiseInputs,
    PatchEmbed,
    check_pooled,
    check_sizes,
    load_weights_strict,
    modulate,
    norm_linear,
    zero_linear,
)
from .npnet_compat import HUB, NPNetCompat, NPNetCompatConfig, check_policy_type
from .projector import check_inputs, moment_match

RANK_FREQS = 8  # sine-cosine features of a singular value's relative rank
Film = tuple[torch.Tensor, torch.Tensor] | None  # (scale, shift), each (B, 1, d)
__all__ = ["NPNet", "NPNetCompat", "NPNetCompatConfig", "NPNetConfig"]


@dataclass
class NPNetConfig(NoiseInputs):
    """Size of the improved :class:`NPNet` and the pipeline it was trained for."""

    hidden_dim: int = 128
    """Width of both branches."""
    depth: int = 2
    """Blocks of the residual (patch) branch."""
    spectral_depth: int = 1
    """Blocks of the spectral (singular value) branch."""
    num_heads: int = 4
    """Attention heads."""
    patch_size: int = 4
    """Latent pixels per patch side in the residual branch."""
    mlp_ratio: float = 2.0
    """MLP width / hidden_dim."""
    moment_match: bool = True
    """Give ε′ the per-sample mean and std of ε."""
    pipeline_signature: dict[str, Any] | None = None
    """noisealign.pipelines.pipeline_signature of the training pipeline."""
    pipeline: str | None = None
    """Folder or hub id of that pipeline."""
    policy_type: str = "npnet"
    """Key in noisealign.policies.POLICIES."""

    def __post_init__(self) -> None:
        check_policy_type(self, "npnet")
        names = ("latent_channels", "text_dim", "hidden_dim", "depth", "spectral_depth")
        check_sizes(self, "npnet", (*names, "num_heads", "patch_size"))


class NPNet(nn.Module, PyTorchModelHubMixin, tags=["noisealign", "npnet"], **HUB):
    """Improved NPNet ``(B, C, H, W)`` → ``(B, C, H, W)``, same dtype; see the module docstring."""

    config_class = NPNetConfig
    _from_pretrained = classmethod(load_weights_strict)  # every key must match

    def __init__(self, config: NPNetConfig) -> None:
        super().__init__()
        self.config = config
        d, c, p = config.hidden_dim, config.latent_channels, config.patch_size
        self.token_in = norm_linear(config.text_dim, d)
        self.pooled_film = (
            None if config.pooled_dim is None else zero_linear(config.pooled_dim, 4 * d)
        )
        # spectral branch: one token per singular value of each channel
        self.spectral_in = nn.Linear(1 + 2 * RANK_FREQS, d)
        self.channel_embed = nn.Embedding(c, d)
        self.spectral_blocks = nn.ModuleList(
            AttentionBlock(d, config.num_heads, config.mlp_ratio)
            for _ in range(config.spectral_depth)
        )
        self.spectral_head = norm_linear(d, 1, zero=True)
        # residual branch: patches of the noise
        self.patch_embed = PatchEmbed(c, d, p)
        self.blocks = nn.ModuleList(
            AttentionBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.head = norm_linear(d, c * p * p, zero=True)

    def spectral(
        self, x: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor, film: Film
    ) -> torch.Tensor:
        """``U diag(Δs) Vᵀ`` per channel, ``(B, C, H, W)``; ``tokens`` (B, L, d), ``pad`` (B, L)."""
        b, c, h, w = x.shape
        u, s, vh = (
            t.to(x.dtype) for t in torch.linalg.svd(x.float().flatten(0, 1), full_matrices=False)
        )
        # ≈ the largest singular value of an h × w N(0, 1) matrix: keeps s / scale in [0, 1]
        scale = math.sqrt(h) + math.sqrt(w)
        rank = torch.linspace(0, 1, s.shape[1], device=x.device, dtype=x.dtype)[:, None]
        freqs = math.pi * 2.0 ** torch.arange(RANK_FREQS, device=x.device, dtype=x.dtype)
        rank = torch.cat([(rank * freqs).sin(), (rank * freqs).cos()], dim=1).expand(b * c, -1, -1)
        t = self.spectral_in(torch.cat([s[..., None] / scale, rank], dim=2))
        t = t + self.channel_embed.weight.repeat(b, 1)[:, None]
        if film is not None:
            t = modulate(t, film[0].repeat_interleave(c, 0), film[1].repeat_interleave(c, 0))
        tokens, pad = tokens.repeat_interleave(c, 0), pad.repeat_interleave(c, 0)
        for block in self.spectral_blocks:
            t = block(t, tokens, context_pad=pad)
        delta = self.spectral_head(t).squeeze(2) * scale  # (B·C, k)
        return ((u * delta[:, None]) @ vh).reshape(b, c, h, w)

    def residual(
        self, x: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor, film: Film
    ) -> torch.Tensor:
        """Patch-transformer residual, ``(B, C, H, W)``."""
        patches, grid = self.patch_embed(x, x.dtype)
        if film is not None:
            patches = modulate(patches, *film)
        for block in self.blocks:
            patches = block(patches, tokens, context_pad=pad)
        return self.patch_embed.unpatchify(self.head(patches), grid, x.shape[2:])

    def forward(
        self,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε′ for ``noise`` (B, C, H, W), prompts ``embeds`` (B, L, D), ``mask`` (B, L) bool and
        ``pooled`` (B, P)."""
        check_inputs(noise, embeds, self.config.latent_channels, self.config.text_dim)
        check_pooled(pooled, self.pooled_film, "NPNet")
        dtype = self.spectral_in.weight.dtype
        x = noise.to(dtype)
        pad = (
            torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            if mask is None
            else ~mask.bool()
        )
        tokens = self.token_in(embeds.to(dtype))
        film_s = film_r = None  # (scale, shift) of each branch's tokens, from SDXL's pooled
        if self.pooled_film is not None:
            chunks = self.pooled_film(pooled.to(dtype))[:, None].chunk(4, dim=-1)
            film_s, film_r = chunks[:2], chunks[2:]
        r = self.spectral(x, tokens, pad, film_s) + self.residual(x, tokens, pad, film_r)
        out = moment_match(x, r) if self.config.moment_match else x + r
        return out.to(noise.dtype)
