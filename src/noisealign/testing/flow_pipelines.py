"""Tiny flow-matching pipelines from configs, with random seeded weights, offline: SD3 and FLUX.

The real classes at toy scale: SD3's replica is a 2-layer ``SD3Transformer2DModel`` on
16-channel latents, two CLIP encoders with projection, a T5 encoder of 96 hidden and a
flow-matching Euler scheduler; FLUX's a 1 + 1-block ``FluxTransformer2DModel`` on packed
16-channel latents, a CLIP encoder (pooled only) and the same T5. The CLIP encoders, the VAE
and the vocabulary are :mod:`noisealign.testing.pipelines`'s.

Example:
    >>> from noisealign.testing.flow_pipelines import build_tiny_sd3_pipeline
    >>> pipe = build_tiny_sd3_pipeline()
    >>> pipe.transformer.config.in_channels
    16
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..pipelines.tokenizers import build_clip_tokenizer, build_t5_tokenizer
from .pipelines import LATENT_SIZE, TEXT_HIDDEN, TINY_VOCAB, _finish, _text_config, _vae

# SD3 zero-pads the two CLIP encoders' features (2 x 32 here, 768 + 1280 in SD3) to T5's width
# (4096 in SD3); wider here too, so the padding is there to see
T5_HIDDEN = 96


def _sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_HIDDEN,  # the joint CLIP/T5 sequence's width
        caption_projection_dim=32,  # = heads x head dim, as in SD3
        pooled_projection_dim=2 * TEXT_HIDDEN,  # the two CLIP projections concatenated
        pos_embed_max_size=LATENT_SIZE,  # patches per side: images up to 64 pixels
    )


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The 16-channel VAE of SD3 and FLUX.1: their latent scaling and shift, no quant convs."""
    return _vae(
        16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _t5_encoder(vocab_size: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=T5_HIDDEN,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def build_tiny_sd3_pipeline(
    folder: str | Path | None = None, *, seed: int = 0
) -> StableDiffusion3Pipeline:
    """A tiny ``StableDiffusion3Pipeline`` (CLIP-L/CLIP-G/T5 text, 16-channel flow-matching
    latents); saved to ``folder`` if given. Weights depend only on ``seed``.

    The T5 tokenizer pads to 256 tokens like ``pipe(prompt)``'s ``max_sequence_length``, so the
    joint sequence is 77 + 256 tokens of width 96.
    """
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer")
        tokenizer_2 = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer_2")
        tokenizer_3 = build_t5_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer_3")
        torch.manual_seed(seed)
        pipe = StableDiffusion3Pipeline(
            transformer=_sd3_transformer(),
            # SD3-medium's scheduler shift, and its VAE's latent scaling, shift and no quant convs
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_flow_vae(scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer)).eval(),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2)).eval(),
            tokenizer_2=tokenizer_2,
            text_encoder_3=_t5_encoder(len(tokenizer_3)),
            tokenizer_3=tokenizer_3,
        )
        _finish(pipe, folder)
    return pipe


def _flux_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 2x2 patches of the 16-channel latents, packed by the pipeline
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,  # FLUX's text sequence is T5's alone
        pooled_projection_dim=TEXT_HIDDEN,  # CLIP's pooled output
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim: text position, latent row, column
    )


def _flux_scheduler(distilled_guidance: bool) -> FlowMatchEulerDiscreteScheduler:
    if distilled_guidance:  # FLUX.1-dev's: the shift depends on the image's token count
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        )
    return FlowMatchEulerDiscreteScheduler(shift=1.0)  # FLUX.1-schnell's


def build_tiny_flux_pipeline(
    folder: str | Path | None = None, *, seed: int = 0, guidance_embeds: bool = True
) -> FluxPipeline:
    """A tiny ``FluxPipeline`` (CLIP pooled + T5 text, packed 16-channel flow-matching latents);
    saved to ``folder`` if given. Weights depend only on ``seed``.

    ``guidance_embeds=True`` builds a FLUX.1-dev-like replica (guidance-distilled:
    ``guidance_scale`` is embedded by the transformer), ``False`` a FLUX.1-schnell-like one (no
    guidance input). The T5 tokenizer pads to 512 tokens like ``pipe(prompt)``'s
    ``max_sequence_length``.
    """
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer")
        tokenizer_2 = build_t5_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer_2", 512)
        torch.manual_seed(seed)
        pipe = FluxPipeline(
            transformer=_flux_transformer(guidance_embeds),
            scheduler=_flux_scheduler(guidance_embeds),
            # FLUX.1's VAE latent scaling and shift, no quant convs
            vae=_flow_vae(scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=CLIPTextModel(_text_config(tokenizer)).eval(),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(len(tokenizer_2)),
            tokenizer_2=tokenizer_2,
        )
        _finish(pipe, folder)
    return pipe
