"""The UNet encoder of the ``unet_lora`` reward model and the processor that reads its tokens.

:class:`UNetEncoder` runs a diffusers UNet up to its mid block as its own forward does;
:class:`CrossAttentionReader` replaces the cross-attention processors and records, per
prompt token, the image features weighted by the attention paid to it and that attention's
mass. Used by :class:`~noisealign.rewards.unet_backbone.UNetRewardModel`.
"""

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D
from torch import nn

from ..errors import PipelineError


class CrossAttentionReader:
    """Attention processor that computes plain attention and records per-token image features.

    Adapted from diffusers' ``AttnProcessor`` (diffusers 0.42.1, models/attention_processor.py);
    changes: no spatial/group norm or 4-D inputs (absent in SD/SDXL cross-attention), and the
    attention probabilities are turned into (B, L, C + 1) token features appended to ``store``.
    Only the cross-attention layers use it: the features need the probabilities, which SDPA does
    not return, and with L = 77 text tokens they are small; self-attention keeps the pipeline's
    SDPA processor. ``store`` is ``None`` outside the model's forward, so the block recomputation
    of gradient checkpointing (in the backward pass) keeps nothing alive.
    """

    def __init__(self) -> None:
        self.store: list[torch.Tensor] | None = None

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch, pixels, channels = hidden_states.shape
        context = (
            attn.norm_encoder_hidden_states(encoder_hidden_states)
            if attn.norm_cross
            else encoder_hidden_states
        )
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # (B*heads, N, L)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value))))
        per_token = probs.view(batch, -1, pixels, probs.shape[-1]).mean(1)  # (B, N, L)
        mass = per_token.sum(1, keepdim=True)  # (B, 1, L)
        pooled = (per_token / mass.clamp(min=1e-6)).transpose(1, 2) @ hidden_states  # (B, L, C)
        if self.store is not None:  # the recomputation must still run the same ops
            self.store.append(torch.cat([pooled, mass.transpose(1, 2)], dim=-1))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class UNetEncoder(nn.Module):
    """The UNet up to its mid block; ``forward`` mirrors ``UNet2DConditionModel.forward``
    for SD and SDXL."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        cfg = unet.config
        if (
            cfg.class_embed_type is not None
            or cfg.encoder_hid_dim_type is not None
            or cfg.time_embedding_act_fn is not None
        ):
            raise PipelineError(
                "the unet_lora reward model supports SD 1.x/2.x and SDXL UNets only; use "
                "'transformer'"
            )
        self.text_time = cfg.addition_embed_type == "text_time"
        self.conv_in, self.time_proj, self.time_embedding = (
            unet.conv_in,
            unet.time_proj,
            unet.time_embedding,
        )
        self.add_time_proj = unet.add_time_proj if self.text_time else None
        self.add_embedding = unet.add_embedding if self.text_time else None
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block

    def forward(self, x, timestep: int, context, pooled, vae_scale: int) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.full((batch,), timestep, device=x.device, dtype=torch.long)
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        if self.text_time:
            h, w = x.shape[2] * vae_scale, x.shape[3] * vae_scale
            ids = torch.tensor([h, w, 0, 0, h, w], device=x.device, dtype=x.dtype).repeat(batch)
            time_embeds = self.add_time_proj(ids).reshape(batch, -1)
            emb = emb + self.add_embedding(torch.cat([pooled, time_embeds], dim=-1).to(emb.dtype))
        sample = self.conv_in(x)
        for block in self.down_blocks:
            if isinstance(block, CrossAttnDownBlock2D):
                sample, _ = block(sample, emb, encoder_hidden_states=context)
            else:
                sample, _ = block(sample, emb)
        return self.mid_block(sample, emb, encoder_hidden_states=context)
