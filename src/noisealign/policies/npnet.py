"""NPNet (Golden Noise, Zhou et al., arXiv 2411.09502): the official architecture and an improved one.

Both map ``noise (B, C, H, W), embeds (B, L, D), mask (B, L), pooled (B, P)`` to ε′ of noise's
shape and dtype, like :class:`~noisealign.policies.NoiseProjector`, and save as a folder.

:class:`NPNetCompat` (``policy_type="npnet_compat"``) is the released network layer for layer
(DESIGN.md section 4), so the official checkpoints load (:mod:`.npnet_convert`)::

    ε′ = svd(ε) + (2σ(α) − 1)·e + β·residual(ε + e),   e = AdaGroupNorm(ε, flatten(embeds))

It only takes 4 × ``resolution``² latents and exactly ``text_length`` tokens; it ignores
``mask`` and ``pooled`` (the official one does too) and does NOT keep ε′ Gaussian.

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
from dataclasses import dataclass, field
from typing import Any

import einops
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import ConfigError
from ..rewards.model import sincos_2d
from .projector import ProjectorBlock, check_inputs, moment_match
from .swin import SwinResidual

RANK_FREQS = 8  # sine-cosine features of a singular value's relative rank
Film = tuple[torch.Tensor, torch.Tensor] | None  # (scale, shift), each (B, 1, d)
_HUB = dict(library_name="noisealign", repo_url="https://github.com/noisealign/noisealign")


def _check_policy_type(config: Any, expected: str) -> None:
    if config.policy_type != expected:
        raise ConfigError(f"field 'policy_type' must be '{expected}', got {config.policy_type!r}")


# ----------------------------------------------------------------------------- compatible
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
        _check_policy_type(self, "npnet_compat")
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


class NPNetCompat(nn.Module, PyTorchModelHubMixin, tags=["noisealign", "npnet"], **_HUB):
    """The official NPNet; ``(B, 4, R, R)`` noise, ``(B, 77, D)`` embeds → ``(B, 4, R, R)``."""

    config_class = NPNetCompatConfig

    def __init__(self, config: NPNetCompatConfig) -> None:
        super().__init__()
        from diffusers.models.normalization import AdaGroupNorm

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

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> "NPNetCompat":
        from ..rewards.loading import load_weights_strict

        return load_weights_strict(cls, model_id=model_id, **kwargs)


# ------------------------------------------------------------------------------- improved
@dataclass
class NPNetConfig:
    """Size of the improved :class:`NPNet` and the pipeline it was trained for."""

    latent_channels: int = 4
    """C of the noise."""
    text_dim: int = 768
    """D of the prompt token embeddings."""
    pooled_dim: int | None = None
    """P of the pooled embedding (SDXL), None for SD."""
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
        _check_policy_type(self, "npnet")
        for name in (
            "latent_channels",
            "text_dim",
            "hidden_dim",
            "depth",
            "spectral_depth",
            "num_heads",
            "patch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"npnet field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim % self.num_heads or self.hidden_dim % 4:
            raise ConfigError(
                f"npnet field 'hidden_dim' ({self.hidden_dim}) must divide by num_heads "
                f"({self.num_heads}) and by 4 (2-D sine-cosine positions)"
            )


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class NPNet(nn.Module, PyTorchModelHubMixin, tags=["noisealign", "npnet"], **_HUB):
    """Improved NPNet ``(B, C, H, W)`` → ``(B, C, H, W)``, same dtype; see the module docstring."""

    config_class = NPNetConfig

    def __init__(self, config: NPNetConfig) -> None:
        super().__init__()
        self.config = config
        d, c, p = config.hidden_dim, config.latent_channels, config.patch_size
        self.token_in = nn.Sequential(nn.LayerNorm(config.text_dim), nn.Linear(config.text_dim, d))
        self.pooled_film = (
            None if config.pooled_dim is None else _zero_linear(config.pooled_dim, 4 * d)
        )
        # spectral branch: one token per singular value of each channel
        self.spectral_in = nn.Linear(1 + 2 * RANK_FREQS, d)
        self.channel_embed = nn.Embedding(c, d)
        self.spectral_blocks = nn.ModuleList(
            ProjectorBlock(d, config.num_heads, config.mlp_ratio)
            for _ in range(config.spectral_depth)
        )
        self.spectral_head = nn.Sequential(nn.LayerNorm(d), _zero_linear(d, 1))
        # residual branch: patches of the noise
        self.patch_embed = nn.Sequential(
            nn.Conv2d(c, d // 2, 3, padding=1), nn.GELU(), nn.Conv2d(d // 2, d, p, stride=p)
        )
        self.blocks = nn.ModuleList(
            ProjectorBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.head = nn.Sequential(nn.LayerNorm(d), _zero_linear(d, c * p * p))

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
            t = t * (1 + film[0].repeat_interleave(c, 0)) + film[1].repeat_interleave(c, 0)
        tokens, pad = tokens.repeat_interleave(c, 0), pad.repeat_interleave(c, 0)
        for block in self.spectral_blocks:
            t = block(t, tokens, pad)
        delta = self.spectral_head(t).squeeze(2) * scale  # (B·C, k)
        return ((u * delta[:, None]) @ vh).reshape(b, c, h, w)

    def residual(
        self, x: torch.Tensor, tokens: torch.Tensor, pad: torch.Tensor, film: Film
    ) -> torch.Tensor:
        """Patch-transformer residual, ``(B, C, H, W)``."""
        p, (height, width) = self.config.patch_size, x.shape[2:]
        grid = self.patch_embed(F.pad(x, (0, (-width) % p, 0, (-height) % p)))
        h, w = grid.shape[2:]
        patches = grid.flatten(2).transpose(1, 2) + sincos_2d(h, w, grid.shape[1], grid.device).to(
            x.dtype
        )
        if film is not None:
            patches = patches * (1 + film[0]) + film[1]
        for block in self.blocks:
            patches = block(patches, tokens, pad)
        out = self.head(patches).transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return F.pixel_shuffle(out, p)[:, :, :height, :width]

    def forward(
        self,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ε′ for ``noise`` (B, C, H, W), ``embeds`` (B, L, D), ``mask`` (B, L) bool, ``pooled`` (B, P)."""
        check_inputs(noise, embeds, self.config.latent_channels, self.config.text_dim)
        if (pooled is None) != (self.pooled_film is None):
            raise ValueError(
                f"this NPNet {'needs' if self.pooled_film is not None else 'takes no'} pooled "
                "embeddings; pass PromptEmbeddings.pooled of the pipeline it was trained for"
            )
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

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> "NPNet":
        from ..rewards.loading import load_weights_strict

        return load_weights_strict(cls, model_id=model_id, **kwargs)
