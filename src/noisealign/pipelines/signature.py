"""A pipeline's shape-relevant identity, saved beside policies and reward models.

A policy or reward model trained on one pipeline's token embeddings and latents is only valid
for pipelines that produce the same shapes from the same tokenizer; comparing signatures
turns a silent mismatch (or a cryptic matmul error) into a one-line :class:`PipelineError`.
"""

from __future__ import annotations

import json
from typing import Any

from diffusers import DiffusionPipeline

from ..errors import PipelineError
from .adapters import adapter_for
from .inputs import default_latent_size


def pipeline_signature(pipe: DiffusionPipeline) -> dict[str, Any]:
    """JSON-able facts about ``pipe`` that a policy or reward model depends on.

    Keys: ``pipeline_class``, ``text_encoder_class`` (``"+"``-joined for several encoders),
    ``text_embed_dim`` D, ``text_length`` L, ``pooled_dim`` P or ``None``, ``latent_channels`` C,
    ``default_latent_size`` ``[h, w]``, ``vae_scale_factor``, ``tokenizer_vocab_size`` (of the
    first tokenizer).
    """
    adapter = adapter_for(pipe)
    encoders = adapter.text_encoders(pipe)
    return {
        "pipeline_class": type(pipe).__name__,
        "text_encoder_class": "+".join(type(e).__name__ for e in encoders),
        "text_embed_dim": adapter.text_dim(pipe),
        "text_length": sum(limit for _, limit in adapter.token_streams(pipe)),
        "pooled_dim": adapter.pooled_dim(pipe),
        "latent_channels": adapter.latent_channels(pipe),
        "default_latent_size": list(default_latent_size(pipe)),
        "vae_scale_factor": int(pipe.vae_scale_factor),
        "tokenizer_vocab_size": len(pipe.tokenizer),
    }


def check_compatible(expected: dict[str, Any], actual: dict[str, Any], what: str) -> None:
    """Raise :class:`PipelineError` naming every key of ``expected`` whose value differs in
    ``actual``.

    ``what`` names the artefact, e.g. ``"reward model 'reward_models/toy'"``. Values are compared
    after a JSON round trip, so a signature read back from disk equals the live one.
    """
    expected, actual = json.loads(json.dumps(expected)), json.loads(json.dumps(actual))
    missing = object()
    mismatches = [
        f"{key}: expected {expected[key]!r}, got "
        f"{'missing' if actual.get(key, missing) is missing else repr(actual[key])}"
        for key in expected
        if actual.get(key, missing) != expected[key]
    ]
    if mismatches:
        raise PipelineError(
            f"{what} was built for a different pipeline ({'; '.join(mismatches)}); "
            "load the pipeline it was trained with or retrain it on this one"
        )
