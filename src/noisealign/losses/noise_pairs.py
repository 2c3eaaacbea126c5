"""The supervised loss of train_npnet: NPNet's prediction against the re-denoised target noise.

Golden Noise (Zhou et al., arXiv 2411.09502, Alg. 2 and Eq. 9) trains the noise prompt network
φ on pairs (x_T, x′_T, c) with

    L = ℓ(φ(x_T, E(c)), x′_T),   ℓ = mean squared error over every latent element.

The identity map's error ‖x_T − x′_T‖² is the natural yardstick: ``relative_mse`` < 1 means
the network predicts the target better than returning its input unchanged.
"""

from __future__ import annotations

import torch


def noise_pair_loss(
    predicted: torch.Tensor, target: torch.Tensor, source: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(loss, metrics)`` for ``predicted`` = φ(x_T, e), ``target`` = x′_T, ``source`` = x_T, all
    ``(B, C, H, W)``.

    loss = mean((φ(x_T, e) − x′_T)²) in float32; metrics: ``mse``, ``identity_mse`` =
    mean((x_T − x′_T)²) and their ratio ``relative_mse``.

    Example:
        >>> x, y = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
        >>> noise_pair_loss(y, y, x)[1]["relative_mse"]
        0.0
    """
    if predicted.shape != target.shape or source.shape != target.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)}, target {tuple(target.shape)} and source "
            f"{tuple(source.shape)} must have one shape"
        )
    squared_error = (predicted.float() - target.float()).pow(2)
    loss = squared_error.mean()
    with torch.no_grad():
        identity_mse = (source.float() - target.float()).pow(2).mean()
    metrics = {
        "mse": loss.item(),
        "identity_mse": identity_mse.item(),
        "relative_mse": (loss / identity_mse.clamp(min=1e-12)).item(),
    }
    return loss, metrics
