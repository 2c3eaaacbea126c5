"""Tiny Stable Diffusion, SDXL, SD3 and FLUX pipelines from configs, with random seeded weights,
offline.

Shapes mirror the real families at toy scale: CLIP text encoders of 2 layers x 32 hidden,
a ~1.5 M-parameter UNet on 16x16 latents, a VAE with two blocks (scale factor 2, so 32x32
images) and a DDIM scheduler. SD3's replica has the real classes too: a 2-layer
``SD3Transformer2DModel`` on 16-channel latents, two CLIP encoders with projection, a T5
encoder of 96 hidden and a flow-matching Euler scheduler; FLUX's a 1 + 1-block
``FluxTransformer2DModel`` on packed 16-channel latents, a CLIP encoder (pooled only) and the
same T5. Generating a batch takes a fraction of a second on a CPU.

Example:
    >>> from noisealign.testing.pipelines import build_tiny_sd_pipeline
    >>> pipe = build_tiny_sd_pipeline()
    >>> pipe.vae_scale_factor, pipe.unet.config.sample_size
    (2, 16)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from ..pipelines.tokenizers import build_clip_tokenizer, build_t5_tokenizer

# Whole-word tokens of the tiny tokenizer: enough for the prompts tests and examples write.
TINY_VOCAB: tuple[str, ...] = tuple(
    (
        # colours
        "red green blue yellow orange purple pink brown black white gray "
        # shapes
        "circle square triangle star heart cross ring rectangle diamond hexagon "
        # animals
        "cat dog bird horse cow sheep fish rabbit bear elephant zebra giraffe duck mouse lion "
        # objects
        "car bus bike boat plane tree house chair table cup bottle book clock lamp ball apple "
        "banana flower hat umbrella bench bed phone kite "
        # relations
        "left right above below on under near next to behind in front top bottom inside beside "
        # counts, sizes, function words
        "one two three four small large big tiny a an the of and with is are photo picture "
        "painting image sitting standing background sky grass water "
    ).split()
)

TEXT_HIDDEN = 32  # CLIP hidden size of each tiny text encoder
LATENT_SIZE = 16  # UNet sample size; images are LATENT_SIZE * 2 pixels


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    # eos_token_id must be the tokenizer's: CLIP pools the hidden state at the first EOS token
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(latent_channels: int = 4, **extra: object) -> AutoencoderKL:
    # two blocks -> vae_scale_factor 2**(2-1) = 2
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=LATENT_SIZE * 2,
        **extra,
    )


def _scheduler() -> DDIMScheduler:
    # SD's training schedule; steps_offset=1 as in SD checkpoints (and to silence a FutureWarning)
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        **extra,
    )


def _finish(pipe: Any, folder: str | Path | None) -> None:
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(folder)


def build_tiny_sd_pipeline(
    folder: str | Path | None = None, *, seed: int = 0
) -> StableDiffusionPipeline:
    """A tiny ``StableDiffusionPipeline``; saved to ``folder`` (loadable by ``load_pipeline``) if
    given.

    Weights depend only on ``seed``; the global torch RNG is left untouched.
    """
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer")
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer)).eval(),
            tokenizer=tokenizer,
            unet=_unet(cross_attention_dim=TEXT_HIDDEN),
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        _finish(pipe, folder)
    return pipe


def build_tiny_sdxl_pipeline(
    folder: str | Path | None = None, *, seed: int = 0
) -> StableDiffusionXLPipeline:
    """A tiny ``StableDiffusionXLPipeline`` (two text encoders, ``text_time`` conditioning).

    Saved to ``folder`` if given. Weights depend only on ``seed``.
    """
    time_embed_dim = 8
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer")
        tokenizer_2 = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer_2")
        torch.manual_seed(seed)
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(tokenizer)).eval(),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2)).eval(),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=_unet(
                cross_attention_dim=2 * TEXT_HIDDEN,  # the two encoders' hidden states concatenated
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=time_embed_dim,
                transformer_layers_per_block=(1, 2),
                # 6 size/crop ids embedded with time_embed_dim each, plus the pooled projection
                projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
            ),
            scheduler=_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        _finish(pipe, folder)
    return pipe


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
            vae=_vae(
                16,
                scaling_factor=1.5305,
                shift_factor=0.0609,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
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

    ``guidance_embeds=True`` builds a FLUX.1-dev-like replica (guidance-distilled: ``guidance_scale``
    is embedded by the transformer), ``False`` a FLUX.1-schnell-like one (no guidance input). The
    T5 tokenizer pads to 512 tokens like ``pipe(prompt)``'s ``max_sequence_length``.
    """
    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        tokenizer = build_clip_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer")
        tokenizer_2 = build_t5_tokenizer(TINY_VOCAB, Path(tmp) / "tokenizer_2", 512)
        torch.manual_seed(seed)
        pipe = FluxPipeline(
            transformer=_flux_transformer(guidance_embeds),
            scheduler=_flux_scheduler(guidance_embeds),
            # FLUX.1's VAE latent scaling and shift, no quant convs
            vae=_vae(
                16,
                scaling_factor=0.3611,
                shift_factor=0.1159,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            text_encoder=CLIPTextModel(_text_config(tokenizer)).eval(),
            tokenizer=tokenizer,
            text_encoder_2=_t5_encoder(len(tokenizer_2)),
            tokenizer_2=tokenizer_2,
        )
        _finish(pipe, folder)
    return pipe
