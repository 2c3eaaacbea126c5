"""Diffusers pipelines: loading, the sampler chosen by name, prompt encoding with token offsets,
generation from given noise, and single DDIM / DDIM-inversion steps.

Supported families are the keys of :data:`noisealign.pipelines.adapters.ADAPTERS`
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``).

Example:
    >>> from noisealign.pipelines import load_pipeline, encode_prompts, latent_shape, generate
    >>> from noisealign.noise import batch_noise
    >>> pipe = load_pipeline("runs/tiny_sd")  # doctest: +SKIP
    >>> emb = encode_prompts(pipe, ["a red circle"])  # doctest: +SKIP
    >>> noise = batch_noise(["p0"], [0], latent_shape(pipe))  # doctest: +SKIP
    >>> images = generate(pipe, emb, noise, num_inference_steps=20, guidance_scale=7.5)  # doctest:
    +SKIP
"""

from .adapters import ADAPTERS, PipelineAdapter
from .encoding import PromptEmbeddings, encode_prompts, negative_embeddings
from .inputs import latent_shape
from .loading import load_pipeline, resolve_dtype
from .sampling import denoise_step, generate, inversion_step, re_denoise
from .schedulers import SCHEDULERS, set_scheduler
from .signature import check_compatible, pipeline_signature

__all__ = [
    "ADAPTERS",
    "PipelineAdapter",
    "PromptEmbeddings",
    "SCHEDULERS",
    "check_compatible",
    "denoise_step",
    "encode_prompts",
    "generate",
    "inversion_step",
    "latent_shape",
    "load_pipeline",
    "negative_embeddings",
    "pipeline_signature",
    "re_denoise",
    "resolve_dtype",
    "set_scheduler",
]
