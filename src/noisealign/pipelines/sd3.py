"""Stable Diffusion 3: CLIP-L, CLIP-G and T5 text, a flow-matching transformer on 16-channel
latents.

SD3 conditions on one joint sequence: the two CLIP encoders' penultimate hidden states
(77 tokens, features concatenated and zero-padded to T5's width), then T5's last hidden state
(:data:`MAX_SEQUENCE_LENGTH` tokens); and on a pooled vector, the two CLIP projections
concatenated. The token positions are those of the CLIP tokenizer (the second CLIP tokenizer
gives the same), then those of the T5 tokenizer, so a word of the prompt has one position in
each part and the character offsets of both index the prompt.

The transformer predicts the flow-matching velocity; ``pipe()``'s schedule is the scheduler's
own (shifted by ``shift``, or by ``mu`` from the image's patch count when
``use_dynamic_shifting`` is set), and :meth:`StableDiffusion3Adapter.set_timesteps` sets the same
for the hand-written steps of :mod:`noisealign.pipelines.steps`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ..errors import PipelineError
from .unet import pooled_call_kwargs, sample_size

# pipe(prompt)'s default max_sequence_length: the T5 part of the joint sequence
MAX_SEQUENCE_LENGTH = 256


class StableDiffusion3Adapter:
    """SD3: the joint CLIP/T5 sequence ``(B, 77 + 256, D_T5)`` and pooled ``(B, P_L + P_G)``."""

    load_kwargs: dict[str, Any] = {}
    default_scheduler = "flow_euler"  # keeps a FlowMatchEulerDiscreteScheduler as loaded

    def encode(self, pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check_t5(pipe)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            None,  # prompt_2 and prompt_3 default to the prompt, as in pipe(prompt)
            None,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return embeds, pooled

    def encode_negative(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        # SD3 encodes the empty prompt (no zeros as SDXL base does)
        self._check_t5(pipe)
        _, neg, _, neg_pooled = pipe.encode_prompt(
            [""],
            None,
            None,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return neg, neg_pooled

    def call_kwargs(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        neg: torch.Tensor,
        neg_pooled: torch.Tensor | None,
    ) -> dict[str, Any]:
        return pooled_call_kwargs(embeds, pooled, neg, neg_pooled)

    def model_output(
        self,
        pipe: Any,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        return pipe.transformer(
            hidden_states=latents,
            timestep=timestep.expand(latents.shape[0]),
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def set_timesteps(
        self, pipe: Any, scheduler: Any, num_inference_steps: int, latent_size: tuple[int, int]
    ) -> None:
        # as StableDiffusion3Pipeline.__call__ (diffusers 0.42.1) with no sigmas or mu given
        config = scheduler.config
        if not config.get("use_dynamic_shifting", None):
            scheduler.set_timesteps(num_inference_steps)
            return
        patch = pipe.transformer.config.patch_size
        mu = calculate_shift(
            (latent_size[0] // patch) * (latent_size[1] // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        scheduler.set_timesteps(num_inference_steps, mu=mu)

    def text_encoders(self, pipe: Any) -> list[torch.nn.Module]:
        self._check_t5(pipe)
        return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]

    def text_dim(self, pipe: Any) -> int:
        return int(pipe.transformer.config.joint_attention_dim)

    def token_streams(self, pipe: Any) -> list[tuple[Any, int]]:
        self._check_t5(pipe)
        return [
            (pipe.tokenizer, int(pipe.tokenizer_max_length)),
            (pipe.tokenizer_3, MAX_SEQUENCE_LENGTH),
        ]

    def pooled_dim(self, pipe: Any) -> int | None:
        return sum(int(e.config.projection_dim) for e in (pipe.text_encoder, pipe.text_encoder_2))

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.transformer

    def call_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_channels(self, pipe: Any) -> int:
        return int(pipe.transformer.config.in_channels)

    def default_latent_size(self, pipe: Any) -> tuple[int, int]:
        return sample_size(pipe.transformer)

    @staticmethod
    def _check_t5(pipe: Any) -> None:
        # without T5, encode_prompt gives zeros for its 256 positions, which no token describes
        if pipe.text_encoder_3 is None or pipe.tokenizer_3 is None:
            raise PipelineError(
                "StableDiffusion3Pipeline without its T5 text encoder (text_encoder_3=None) is "
                "not supported; load the pipeline with all three text encoders"
            )
