"""The layers shared by the noise projector, NPNet and the reward models.

- :func:`sincos_2d`: fixed 2-D sine-cosine positions, so one network serves every latent size;
- :class:`PatchEmbed`: the conv patch encoder (3x3 conv, GELU, patch conv) with positions, and
  its inverse :meth:`PatchEmbed.unpatchify`;
- :class:`AttentionBlock`: the pre-norm block of self-attention, cross-attention to a context
  and an MLP (the policies' patches attend to the prompt tokens, the reward model's tokens to
  the noise patches);
- :class:`NoiseInputs`, the fields every network's config starts with; small layers
  (:func:`norm_linear`, :func:`zero_linear`, :func:`encoder_layer`, :func:`modulate`) and the
  checks :func:`check_sizes`, :func:`check_pooled`.

Module attribute names are those of the checkpoints already saved (``patch_embed.0``,
``norm_patches``, ``mlp.3``...), so their state-dict keys still load.

Example:
    >>> embed = PatchEmbed(4, 32, 2)
    >>> patches, grid = embed(torch.randn(2, 4, 15, 9))
    >>> tuple(patches.shape), grid
    ((2, 40, 32), (8, 5))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass
class NoiseInputs:
    """The inputs of every noise network: the first fields of its config."""

    latent_channels: int = 4
    """C of the noise."""
    text_dim: int = 768
    """D of the prompt token embeddings."""
    pooled_dim: int | None = None
    """P of the pooled embedding (SDXL), None for SD."""


def sincos_2d(height: int, width: int, dim: int, device: torch.device) -> torch.Tensor:
    """(height*width, dim) fixed 2-D sine-cosine positions (ViT/MAE style), float32.

    No size limit and no parameters: ``dim`` // 4 frequencies each for sin y, cos y, sin x, cos x.
    """
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    angles_y = ys.flatten()[:, None] * freqs[None]
    angles_x = xs.flatten()[:, None] * freqs[None]
    return torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)


def check_sizes(config: Any, what: str, names: Sequence[str]) -> None:
    """:class:`ConfigError` naming the field when one of ``names`` is < 1 or ``hidden_dim``
    does not divide by ``num_heads`` and by 4 (the four quarters of :func:`sincos_2d`)."""
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{what} field '{name}' must be >= 1, got {getattr(config, name)}")
    if config.hidden_dim % config.num_heads or config.hidden_dim % 4:
        raise ConfigError(
            f"{what} field 'hidden_dim' ({config.hidden_dim}) must divide by num_heads "
            f"({config.num_heads}) and by 4 (2-D sine-cosine positions)"
        )


def check_pooled(pooled: torch.Tensor | None, layer: nn.Module | None, what: str) -> None:
    """``ValueError`` when ``pooled`` is given to a model without a pooled ``layer`` or missing
    for one with it; ``what`` names the model ("projector", "reward model")."""
    if (pooled is None) != (layer is None):
        raise ValueError(
            f"this {what} {'needs' if layer is not None else 'takes no'} pooled embeddings; pass "
            "PromptEmbeddings.pooled of the pipeline it was trained for"
        )


def zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    """A linear layer whose weight and bias start at 0 (drawn first, so the random stream is
    the same as a plain layer's)."""
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def norm_linear(fan_in: int, fan_out: int, zero: bool = False) -> nn.Sequential:
    """LayerNorm then linear (token inputs and heads); ``zero``: the linear starts at 0."""
    linear = zero_linear(fan_in, fan_out) if zero else nn.Linear(fan_in, fan_out)
    return nn.Sequential(nn.LayerNorm(fan_in), linear)


def encoder_layer(dim: int, heads: int, hidden: int, dropout: float) -> nn.TransformerEncoderLayer:
    """torch's pre-norm GELU self-attention layer, batch first."""
    return nn.TransformerEncoderLayer(
        dim, heads, hidden, dropout, activation="gelu", batch_first=True, norm_first=True
    )


def modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """FiLM: ``x · (1 + scale) + shift``; zero-initialised scale and shift leave ``x`` as it is."""
    return x * (1 + scale) + shift


class PatchEmbed(nn.Sequential):
    """Conv patch encoder ``(B, C, H, W)`` → ``(B, h·w, dim)`` patches plus 2-D positions.

    A 3x3 conv sees each latent pixel's neighbours before patching (shapes are local
    patterns); H and W that do not divide by ``patch`` are zero-padded at the bottom/right.
    """

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__(
            nn.Conv2d(channels, dim // 2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, patch, stride=patch),
        )
        self.patch = patch

    def forward(
        self, x: torch.Tensor, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(patches, (h, w))``; the positions are cast to ``dtype`` (default: the patches').

        The sum takes the wider of the two dtypes: under autocast or FSDP's bf16 the conv
        returns bf16, so float32 positions give float32 patches. Each model passes the dtype
        it was trained with (projector: float32, NPNet: its input's, reward model: default).
        """
        pad_h, pad_w = (-x.shape[2]) % self.patch, (-x.shape[3]) % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        grid = super().forward(x)
        h, w = grid.shape[2:]
        patches = grid.flatten(2).transpose(1, 2)
        pos = sincos_2d(h, w, grid.shape[1], grid.device)
        return patches + pos.to(patches.dtype if dtype is None else dtype), (h, w)

    def unpatchify(
        self, out: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        """``(B, h·w, C·p·p)`` per-patch outputs → ``(B, C, H, W)``, the padding cropped off."""
        out = out.transpose(1, 2).reshape(out.shape[0], -1, *grid)
        return F.pixel_shuffle(out, self.patch)[:, :, : size[0], : size[1]]


class AttentionBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to a context, MLP; ``(B, N, dim)``.

    ``dropout=None`` builds the MLP without a dropout layer (the policies' layout, keys
    ``mlp.0``/``mlp.2``); a float adds one and drops attention weights too (the reward
    model's, ``mlp.0``/``mlp.3``). ``norm_context`` normalises the context as well; the
    layer is called ``norm_patches`` after the reward model's context, the noise patches.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        dropout: float | None = None,
        norm_context: bool = False,
    ) -> None:
        super().__init__()
        p = 0.0 if dropout is None else dropout
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=p, batch_first=True)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_patches = nn.LayerNorm(dim) if norm_context else None
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=p, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        drop = [] if dropout is None else [nn.Dropout(dropout)]
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), *drop, nn.Linear(hidden, dim))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        pad: torch.Tensor | None = None,
        context_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, N, dim) attends to itself and to ``context`` (B, M, dim); ``pad`` (B, N)
        and ``context_pad`` (B, M) are True where a key is padding."""
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        q = self.norm_query(x)
        kv = context if self.norm_patches is None else self.norm_patches(context)
        x = x + self.cross_attn(q, kv, kv, key_padding_mask=context_pad, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))
