"""The noise projector f_θ(ε, e) → ε′: a prompt-aware initial noise in one forward pass.

Architecture (docs/projector.md): a conv patch encoder turns ε (B, C, H, W) into patches
with fixed 2-D sine-cosine positions (any latent size works; sizes not divisible by the patch
are padded and cropped back); ``depth`` pre-norm blocks in which the patches attend to each
other and, per sample, to that prompt's own token embeddings (padding masked); SDXL's pooled
embedding modulates the patches FiLM-style. A linear head, **zero-initialised**, writes a
residual r, unpatchified to (B, C, H, W).

Keeping ε′ Gaussian — the choice and why. ε′ is the residual sum *moment-matched to ε*:

    y = ε + r,   ε′ = μ(ε) + (y − μ(y)) · s(ε) / s(y)

with μ, s the per-sample mean and standard deviation over (C, H, W). So ε′ has exactly the
per-sample mean and std of the input noise (≈ 0 and ≈ 1, as a draw from N(0, I) has), and
at initialisation (r = 0) ε′ = ε bit for bit. A distribution-preserving mix
√(1−γ)·ε + √γ·δ was not used: it is Gaussian only if δ is independent of ε, which a learned
δ(ε, e) is not, and its γ = 0 start has an infinite √γ gradient. What the moment match does
not fix — skew, tails, spatial correlation — is measured (``noisealign.noise.gaussian_stats``
and the lag-1 autocorrelation) and penalised in training
(:func:`noisealign.losses.preference.gaussianity_penalty`).

Example:
    >>> cfg = NoiseProjectorConfig(latent_channels=4, text_dim=32, hidden_dim=32, depth=1)
    >>> f = NoiseProjector(cfg).eval()
    >>> eps = torch.randn(2, 4, 16, 16)
    >>> bool(torch.equal(f(eps, torch.randn(2, 7, 32)), eps))  # identity at initialisation
    True
"""

# no ``from __future__ import annotations``: PyTorchModelHubMixin reads the ``config``
# annotation at class creation to rebuild the dataclass from config.json
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..errors import ConfigError
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

MOMENT_EPS = 1e-6  # keeps s(y) away from 0 for a degenerate residual


@dataclass
class NoiseProjectorConfig(NoiseInputs):
    """Size of :class:`NoiseProjector` and the pipeline it was trained for (``config.json``)."""

    hidden_dim: int = 128
    """Width of the patch transformer."""
    depth: int = 2
    """Patch self-attention + token cross-attention blocks."""
    num_heads: int = 4
    """Attention heads."""
    patch_size: int = 4
    """Latent pixels per patch side (SD1.5 64x64 → 256 patches)."""
    mlp_ratio: float = 4.0
    """MLP width / hidden_dim."""
    residual_scale: float = 1.0
    """s in ε′ = moment_match(ε, s·r): how far ε′ goes along the learned residual. Training
    leaves it at 1 (the weights would absorb any other value); a larger s set afterwards
    extrapolates the learned shift, as classifier-free guidance extrapolates a score
    (docs/projector.md, "Residual scale")."""
    pipeline_signature: dict[str, Any] | None = None
    """noisealign.pipelines.pipeline_signature of the training pipeline."""
    pipeline: str | None = None
    """Folder or hub id of the pipeline it was trained with."""

    def __post_init__(self) -> None:
        names = ("latent_channels", "text_dim", "hidden_dim", "depth", "num_heads", "patch_size")
        check_sizes(self, "projector", names)
        if not self.residual_scale >= 0:  # also refuses NaN
            raise ConfigError(
                f"projector field 'residual_scale' must be >= 0, got {self.residual_scale}"
            )


def check_inputs(noise: torch.Tensor, embeds: torch.Tensor, channels: int, text_dim: int) -> None:
    """``ValueError`` naming both shapes when ``noise``/``embeds`` do not fit the policy."""
    if noise.ndim != 4 or noise.shape[1] != channels:
        raise ValueError(
            f"noise must be (B, {channels}, H, W) for this policy, got {tuple(noise.shape)}; "
            "use the pipeline the policy was trained for"
        )
    if embeds.ndim != 3 or embeds.shape[2] != text_dim or embeds.shape[0] != noise.shape[0]:
        raise ValueError(
            f"embeds must be ({noise.shape[0]}, L, {text_dim}) for noise {tuple(noise.shape)}, "
            f"got {tuple(embeds.shape)}; encode the prompts with the policy's pipeline"
        )


def moment_match(noise: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``μ(ε) + (y − μ(y))·s(ε)/s(y)`` with y = ε + r, per sample over all but the batch dim.

    Written as ε + (r − μ(r))·k + (ε − μ(ε))·(k − 1), k = s(ε)/s(y), which is the same
    value but is exactly ε (bit for bit) when r = 0, while gradients still reach r.
    """
    dims = tuple(range(1, noise.ndim))
    k = noise.std(dims, keepdim=True) / (noise + residual).std(dims, keepdim=True).clamp_min(
        MOMENT_EPS
    )
    centred_r = residual - residual.mean(dims, keepdim=True)
    centred_x = noise - noise.mean(dims, keepdim=True)
    return noise + centred_r * k + centred_x * (k - 1)


class NoiseProjector(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="noisealign",
    repo_url="https://github.com/noisealign/noisealign",
    tags=["noisealign", "noise-policy", "diffusion-noise"],
):
    """f_θ(ε, e) → ε′ ``(B, C, H, W)``, same dtype as ε; see the module docstring."""

    config_class = NoiseProjectorConfig
    # FSDP shard groups (accelerate's TRANSFORMER_BASED_WRAP reads this); the rest joins the root's
    _no_split_modules = ["AttentionBlock"]
    _from_pretrained = classmethod(load_weights_strict)  # every key must match

    def __init__(self, config: NoiseProjectorConfig) -> None:
        super().__init__()
        self.config = config
        dim, p = config.hidden_dim, config.patch_size
        self.patch_embed = PatchEmbed(config.latent_channels, dim, p)
        self.token_in = norm_linear(config.text_dim, dim)
        # FiLM from the pooled embedding: (1 + scale)·patches + shift, zero-initialised
        self.pooled_film = (
            None if config.pooled_dim is None else zero_linear(config.pooled_dim, 2 * dim)
        )
        self.blocks = nn.ModuleList(
            AttentionBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm_out = nn.LayerNorm(dim)
        # r = 0 at initialisation: f_θ is the identity
        self.head = zero_linear(dim, config.latent_channels * p * p)

    def residual(
        self,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """r(ε, e) ``(B, C, H, W)`` float32 before the moment match."""
        # float32 positions whatever the patches' dtype (FSDP's bf16 ones): the sum is float32
        patches, grid = self.patch_embed(noise, torch.float32)
        if self.pooled_film is not None:
            scale, shift = self.pooled_film(pooled).chunk(2, dim=-1)
            patches = modulate(patches, scale[:, None], shift[:, None])
        tokens = self.token_in(embeds)
        pad = ~mask.bool()
        for block in self.blocks:
            patches = block(patches, tokens, context_pad=pad)
        out = self.head(self.norm_out(patches))  # (B, h·w, C·p·p)
        return self.patch_embed.unpatchify(out, grid, noise.shape[2:])

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
        check_pooled(pooled, self.pooled_film, "projector")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        dtype = self.head.weight.dtype
        x = noise.to(dtype)
        r = self.residual(x, embeds.to(dtype), mask, None if pooled is None else pooled.to(dtype))
        return moment_match(x, r * self.config.residual_scale).to(noise.dtype)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
