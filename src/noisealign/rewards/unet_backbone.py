"""The heavier reward model: the diffusion UNet's down and mid blocks at t = T with LoRA adapters.

The noise goes through the pipeline's own UNet encoder (``conv_in``, time embedding at the
first timestep, down blocks, mid block) conditioned on the prompt, exactly as the first
denoising step sees it; LoRA adapters (peft) on its attention projections are trained, the
rest stays frozen, in the recipe's dtype, with gradient checkpointing on its blocks. Token
features are read from every cross-attention layer: for token l, the image features averaged
with the attention the image pays to l, plus the attention mass itself ("how much of the
image looks at this word"; :mod:`.unet_encoder`). A small token transformer and two heads
turn them into token and overall logits; the mid block's mean output joins [CLS].

The folder stores the UNet's config, so ``from_pretrained`` rebuilds it without the pipeline.

Precision: the frozen weights are stored in ``backbone_dtype`` (the distill recipe's
``torch_dtype``), the LoRA adapters and heads in float32, as diffusers' LoRA training scripts
do: an AdamW step of lr 1e-4 on a half-precision weight is mostly lost to rounding and Adam's
eps underflows in float16, while frozen weights only need to be read. Activations run in the
backbone's dtype (peft computes each adapter in float32 and adds it back in the layer's dtype)
or, under accelerate's ``mixed_precision``, in the autocast dtype. The shipped accelerate
configs use bf16; with float16 and no autocast, backward activations are unscaled float16.

Example:
    >>> model = build_reward_model("unet_lora", pipeline="runs/tiny_sd", latent_channels=4,
    ...                            text_dim=32)  # doctest: +SKIP
"""

# no ``from __future__ import annotations``: PyTorchModelHubMixin reads the ``config`` annotation
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from huggingface_hub import PyTorchModelHubMixin
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from ..distillation.card import CARD_TEMPLATE
from ..errors import ConfigError
from ..nn import check_pooled, encoder_layer, load_weights_strict, norm_linear
from .model import RewardOutput, check_input_fields
from .unet_encoder import CrossAttentionReader, UNetEncoder

BACKBONE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class UNetRewardConfig:
    """Fields of :class:`UNetRewardModel`; ``unet_config`` is filled from ``pipeline`` at build."""

    architecture: str = "unet_lora"
    """Always 'unet_lora'."""
    pipeline: str = ""
    """Pipeline whose UNet initialises the backbone."""
    unet_config: dict[str, Any] | None = None
    """The UNet's config (set from the pipeline at build)."""
    latent_channels: int = 4
    """C of the noise."""
    text_dim: int = 768
    """D of the prompt token embeddings."""
    pooled_dim: int | None = None
    """P of the pooled embedding (SDXL)."""
    vae_scale_factor: int = 8
    """Pixels per latent (SDXL size ids)."""
    timestep: int = 999
    """UNet timestep of the pure noise, T."""
    backbone_dtype: str = "float32"
    """dtype of the frozen UNet weights (float32, float16 or bfloat16); distill sets the recipe's
    torch_dtype. LoRA adapters and heads stay float32."""
    gradient_checkpointing: bool = True
    """Recompute the UNet blocks' activations in the backward pass instead of storing them
    (diffusers' enable_gradient_checkpointing)."""
    lora_rank: int = 8
    """LoRA rank of the attention projections."""
    lora_alpha: float = 8.0
    """LoRA scaling numerator."""
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names that get LoRA adapters."""
    hidden_dim: int = 128
    """Width of the token transformer."""
    depth: int = 2
    """Token transformer layers."""
    num_heads: int = 4
    """Attention heads of the token transformer."""
    input_steps: int = 0
    """k: DDIM steps before scoring."""
    input_kind: str = "latent"
    """'latent' or 'x0' for k > 0."""
    num_inference_steps: int = 0
    """Schedule length of the k steps."""
    guidance_scale: float = 0.0
    """CFG scale of the k steps."""
    pipeline_signature: dict[str, Any] | None = None
    """pipeline_signature of the training pipeline."""

    def __post_init__(self) -> None:
        if self.architecture != "unet_lora":
            raise ConfigError(f"config has architecture '{self.architecture}', not 'unet_lora'")
        if self.unet_config is None and not self.pipeline:
            raise ConfigError(
                "reward model field 'pipeline' is required to build the unet_lora backbone"
            )
        if self.backbone_dtype not in BACKBONE_DTYPES:
            raise ConfigError(
                f"reward model field 'backbone_dtype' is '{self.backbone_dtype}'; use one of "
                f"{', '.join(BACKBONE_DTYPES)}"
            )
        if self.lora_rank < 1 or self.hidden_dim % self.num_heads:
            raise ConfigError(
                "reward model fields 'lora_rank' >= 1 and hidden_dim % num_heads == 0"
            )
        check_input_fields(self.input_steps, self.input_kind, self.num_inference_steps)


def _backbone_unet(config: UNetRewardConfig) -> UNet2DConditionModel:
    """The UNet in ``backbone_dtype``: the pipeline's weights, or a shell for saved ones.

    Fills ``config.unet_config`` when built from the pipeline; enables gradient checkpointing
    on its blocks when the config asks for it.
    """
    dtype = BACKBONE_DTYPES[config.backbone_dtype]
    if config.unet_config is None:  # built from a recipe: pretrained weights
        unet = UNet2DConditionModel.from_pretrained(
            config.pipeline, subfolder="unet", torch_dtype=dtype
        )
        config.unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    else:  # from a saved folder: the weights follow from model.safetensors
        unet = UNet2DConditionModel.from_config(config.unet_config)
        nn.Module.to(unet, dtype)  # nn.Module's: diffusers' ModelMixin.to warns on every cast
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # flags the down, mid and transformer blocks
    return unet


class UNetRewardModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="noisealign",
    tags=["noisealign", "reward-model", "diffusion-noise", "lora"],
    model_card_template=CARD_TEMPLATE,
):
    """r_φ(ε, e) on the UNet encoder with LoRA; called like :class:`NoiseRewardModel`."""

    config_class = UNetRewardConfig
    # FSDP shard groups (accelerate's TRANSFORMER_BASED_WRAP reads this): the UNet's blocks and
    # the token layers; every SD UNet has both diffusers classes
    _no_split_modules = ["BasicTransformerBlock", "ResnetBlock2D", "TransformerEncoderLayer"]
    _from_pretrained = classmethod(load_weights_strict)  # every key must match

    def __init__(self, config: UNetRewardConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = UNetEncoder(_backbone_unet(config))
        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.lora_targets
        )
        inject_adapter_in_model(lora, self.encoder)
        for name, param in self.encoder.named_parameters():
            param.requires_grad = "lora_" in name
        cast_training_params(self.encoder, torch.float32)  # peft made them the base's dtype
        self._readers: list[CrossAttentionReader] = []  # a plain list: processors hold no weights
        widths = []
        for name, module in self.encoder.named_modules():
            if name.endswith("attn2"):
                self._readers.append(CrossAttentionReader())
                module.set_processor(self._readers[-1])
                widths.append(module.to_q.in_features)
        dim = config.hidden_dim
        self.readers = nn.ModuleList(norm_linear(c + 1, dim) for c in widths)
        self.token_in = norm_linear(config.text_dim, dim)
        self.pooled_in = None if config.pooled_dim is None else nn.Linear(config.pooled_dim, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        # the mid block's pooled output feeds [CLS], so every LoRA adapter gets a gradient
        mid = self.encoder.mid_block.resnets[-1].conv2.out_channels
        self.mid_in = norm_linear(mid, dim)
        layer = encoder_layer(dim, config.num_heads, 4 * dim, 0.0)
        self.tokens = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.token_head = norm_linear(dim, 1)
        self.overall_head = norm_linear(dim, 1)

    def forward(
        self,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> RewardOutput:
        """Score ``noise`` (B, C, H, W) for prompts ``embeds`` (B, L, D) with ``mask`` (B, L) and
        ``pooled`` (B, P)."""
        check_pooled(pooled, self.pooled_in, "reward model")
        batch, length = embeds.shape[:2]
        mask = (
            torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
            if mask is None
            else mask.bool()
        )
        mid, features = self._encode(noise, embeds, pooled)
        read = sum(r(f.float()) for r, f in zip(self.readers, features)) / len(self.readers)
        cls = self.cls + self.mid_in(mid.float().mean(dim=(2, 3)))[:, None]
        if self.pooled_in is not None:
            cls = cls + self.pooled_in(pooled)[:, None]
        x = torch.cat([cls, self.token_in(embeds) + read], dim=1)
        pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask], dim=1)
        x = self.tokens(x, src_key_padding_mask=pad)
        return RewardOutput(
            self.token_head(x[:, 1:]).squeeze(-1).float(),
            self.overall_head(x[:, 0]).squeeze(-1).float(),
        )

    def _encode(self, noise, embeds, pooled) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The mid block's output and the cross-attention token features, in the backbone dtype."""
        dtype = self.encoder.conv_in.weight.dtype
        features: list[torch.Tensor] = []
        for reader in self._readers:
            reader.store = features
        try:
            mid = self.encoder(
                noise.to(dtype),
                self.config.timestep,
                embeds.to(dtype),
                None if pooled is None else pooled.to(dtype),
                self.config.vae_scale_factor,
            )
        finally:
            for reader in self._readers:
                reader.store = None
        return mid, features


UNET_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def check_backbone(reward_model: str, signature: dict) -> None:
    """:class:`ConfigError` for a ``unet_lora`` reward model on a pipeline without a UNet."""
    if reward_model == "unet_lora" and signature["pipeline_class"] not in UNET_PIPELINES:
        raise ConfigError(
            f"reward_model 'unet_lora' fine-tunes the pipeline's UNet, and "
            f"{signature['pipeline_class']} has a transformer instead; use reward_model: "
            "transformer"
        )
