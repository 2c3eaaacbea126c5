"""Baselines the learned noise is compared against, on the same pipeline, prompts and seeds.

Each returns a :class:`MethodOutput` (images, the initial noise they came from, and the cost:
denoising steps and judge calls per image) for the evaluate stage:

- :func:`best_of_n`: generate N candidates, keep the judge's favourite (N·T steps);
- :func:`early_stop_best_of_n`: judge previews after k of T steps, finish only the best
  (N·k + T − k steps; NoisyCLIP, arXiv 2512.08505);
- :func:`noise_diffusion`: judge-gradient-guided, distribution-preserving noise updates
  (arXiv 2411.16503); needs a :class:`DifferentiableJudge`.

The standard method is ``best_of_n`` with N = 1 (candidate 0 of :func:`candidate_noise` is
the standard noise).
"""

from .best_of_n import (
    LinearPreview,
    best_of_n,
    early_stop_best_of_n,
    fit_linear_preview,
    linear_preview,
)
from .common import (
    MethodOutput,
    candidate_noise,
    decode,
    upcast_vae,
)
from .noise_diffusion import (
    DifferentiableJudge,
    check_differentiable,
    noise_diffusion,
    score_and_gradient,
    select_candidates,
    step_size,
)

__all__ = [
    "DifferentiableJudge",
    "LinearPreview",
    "MethodOutput",
    "best_of_n",
    "candidate_noise",
    "check_differentiable",
    "decode",
    "early_stop_best_of_n",
    "fit_linear_preview",
    "linear_preview",
    "noise_diffusion",
    "score_and_gradient",
    "select_candidates",
    "step_size",
    "upcast_vae",
]
