"""The toy world: procedural shapes, a tiny diffusers text-to-image model, an exact judge.

The trained model ships in the package as a standard ``StableDiffusionPipeline`` folder, so
demos and tests never retrain it; ``recipes/toy/pretrain.yaml`` reproduces it.

Example:
    >>> from diffusers import StableDiffusionPipeline
    >>> pipe = StableDiffusionPipeline.from_pretrained(pipeline_path())
"""

from __future__ import annotations

from pathlib import Path


def pipeline_path() -> Path:
    """Folder of the committed toy pipeline (loads with
    ``StableDiffusionPipeline.from_pretrained``)."""
    return Path(__file__).resolve().parent / "assets" / "pipeline"


def projector_path() -> Path:
    """Folder of the committed toy noise projector (``noisealign.policies.load_policy``)."""
    return Path(__file__).resolve().parent / "assets" / "projector"
