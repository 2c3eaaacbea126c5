"""Swin-T features for the compatible NPNet, built from ``transformers``, with a timm key map.

The official NPNet (xie-lab-ml/Golden-Noise-for-Diffusion-Models, ``training/model/
NoiseTransformer.py``) holds ``timm.create_model("swin_tiny_patch4_window7_224")`` as ``swin``
and calls its ``forward_features``: NHWC ``(B, 7, 7, 768)`` after the final LayerNorm. timm
needs torchvision, which does not install beside a CPU torch, so the same network is built
from ``transformers.SwinModel`` (pure torch): same embed dim 96, depths (2, 2, 6, 2), heads
(3, 6, 12, 24), window 7, LayerNorm eps 1e-5, exact GELU, stochastic depth linspace(0, 0.1)
(active in train mode only), and its ``last_hidden_state`` ``(B, 49, 768)`` reshaped to NHWC.

Key layouts, read from timm's source and checked once by running it (timm 0.9.12 and 0.6.13
wheels unpacked outside the venv with torchvision stubbed, random weights, 2026-11-23): our
``SwinFeatures`` loaded through :func:`timm_to_transformers` matched ``forward_features`` to a
max abs difference of 1.5e-7, and a re-implementation of the official NPNet forward on real
timm matched :class:`~noisealign.policies.npnet_compat.NPNetCompat` to 1e-6 (SDPA vs explicit
softmax).
- timm >= 0.9 (``timm/models/swin_transformer.py`` at huggingface/pytorch-image-models
  65564f7; the authors' requirements pin timm 0.9.12, and the official NHWC quirk needs it:
  timm 0.6's ``forward_features`` returns ``(B, 49, 768)``): ``layers.{i}.downsample``
  (PatchMerging) at the START of stages 1..3, classifier ``head.fc``, no
  ``relative_position_index`` / ``attn_mask`` in the state dict. This layout is written.
- timm < 0.9 (same file at 00001f9): downsample at the END of stages 0..2, classifier
  ``head``, ``relative_position_index`` / ``attn_mask`` saved as buffers. Read too (the
  buffers are dropped: both libraries recompute them from the window size).
transformers names are those of transformers 5.23 (``encoder.layers.{i}.blocks.{j}.attention.
{q,k,v,o}_proj``, ``layernorm_before/after``, ``mlp.fc1/fc2``, downsample at the end of stages
0..2); a strict ``load_state_dict`` catches any later rename. timm's fused ``qkv`` is split in
q, k, v order; both libraries concatenate the 2x2 sub-patches of PatchMerging in the same
order and index the relative-position table identically.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SwinConfig, SwinModel

from ..errors import DataError

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_BLOCK_NAMES = {  # timm block sub-key -> transformers block sub-key
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.o_proj",
    "attn": "attention.relative_position_bias",  # only attn.relative_position_bias_table
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP_NAMES = {
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "patch_embed.norm": "embeddings.norm",
    "norm": "layernorm",
}


class SwinFeatures(nn.Module):
    """timm's ``swin.forward_features``: ``(B, 3, 224, 224)`` → NHWC ``(B, 7, 7, dim)``.

    ``head`` is timm's ImageNet classifier: unused here, kept so a checkpoint's keys all load.
    """

    def __init__(
        self,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        num_classes: int = 1000,
        drop_path: float = 0.1,
    ) -> None:
        super().__init__()
        config = SwinConfig(
            image_size=224,
            patch_size=4,
            num_channels=3,
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=7,
            drop_path_rate=drop_path,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
        self.swin = SwinModel(config, add_pooling_layer=False)
        self.head = nn.Linear(embed_dim * 2 ** (len(depths) - 1), num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.swin(
            pixel_values=image
        ).last_hidden_state  # (B, h·w, dim), final norm applied
        side = int(round(tokens.shape[1] ** 0.5))
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2])


class SwinResidual(nn.Module):
    """Official ``NoiseTransformer``: 224² nearest upsample, 1×1 conv, Swin-T, quirk, 1×1 conv."""

    def __init__(
        self,
        resolution: int,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        drop_path: float = 0.1,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.downconv = nn.Conv2d(4, 3, 1)  # the official names, although it maps 4 → 3
        self.upconv = nn.Conv2d(7, 4, 1)
        self.features = SwinFeatures(embed_dim, depths, num_heads, drop_path=drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(self.downconv(F.interpolate(x, size=(224, 224))))  # (B, 7, 7, 768)
        # the official quirk, kept for its weights: interpolating the NHWC tensor treats the
        # 7 rows as channels and resizes (7 columns, 768 features) to the latent size
        return self.upconv(F.interpolate(feats, size=(self.resolution, self.resolution)))


def timm_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm Swin state dict (either layout, no ``swin.`` prefix) as :class:`SwinFeatures` keys."""
    old_layout = any(k.startswith("layers.0.downsample.") for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # recomputed from the window size on both sides
        if (m := _BLOCK.match(key)) is not None:
            stage, block, rest = m.groups()
            prefix = f"swin.encoder.layers.{stage}.blocks.{block}."
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}attention.{name}_proj.{rest.rsplit('.', 1)[1]}"] = part.clone()
                continue
            module, _, param = rest.rpartition(".")
            if module not in _BLOCK_NAMES:
                raise DataError(f"unknown timm Swin key '{key}'; is this a Swin-T checkpoint?")
            out[f"{prefix}{_BLOCK_NAMES[module]}.{param}"] = value
        elif (m := _DOWN.match(key)) is not None:
            stage = int(m.group(1)) - (0 if old_layout else 1)  # transformers: end of stage i
            out[f"swin.encoder.layers.{stage}.downsample.{m.group(2)}"] = value
        elif key.startswith("head."):
            out["head." + key.rsplit(".", 1)[1]] = value  # head.fc.weight (>= 0.9) or head.weight
        else:
            module, _, param = key.rpartition(".")
            if module not in _TOP_NAMES:
                raise DataError(f"unknown timm Swin key '{key}'; is this a Swin-T checkpoint?")
            out[f"swin.{_TOP_NAMES[module]}.{param}"] = value
    return out


def transformers_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`SwinFeatures` keys as a timm >= 0.9 Swin state dict (the inverse of the above)."""
    inverse_block = {v: k for k, v in _BLOCK_NAMES.items()}
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("head."):
            out["head.fc." + key.rsplit(".", 1)[1]] = value
            continue
        key = key.removeprefix("swin.").removeprefix("encoder.")
        if (m := _BLOCK.match(key)) is not None:
            stage, block, rest = m.groups()
            module, _, param = rest.rpartition(".")
            prefix = f"layers.{stage}.blocks.{block}."
            if module in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
                if module == "attention.q_proj":  # one fused qkv per (q, k, v) triple
                    parts = [
                        state[f"swin.encoder.{prefix}attention.{n}_proj.{param}"] for n in "qkv"
                    ]
                    out[f"{prefix}attn.qkv.{param}"] = torch.cat(parts, dim=0)
                continue
            out[f"{prefix}{inverse_block[module]}.{param}"] = value
        elif (m := _DOWN.match(key)) is not None:
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = value
        else:
            module, _, param = key.rpartition(".")
            out[f"{inverse_top[module]}.{param}"] = value
    return out
