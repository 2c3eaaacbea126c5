"""Deterministic initial noise, Gaussianity checks and the distribution-preserving mix.

The noise for a (prompt id, seed, latent shape) key is drawn on the CPU from a generator
seeded from that key alone, so it is bit-identical whatever the batch size, process count
or device that later consumes it. Collected datasets therefore need not store the noise.

Example:
    >>> from noisealign.noise import initial_noise
    >>> x = initial_noise("p0", 3, (4, 16, 16))
    >>> x.shape
    torch.Size([4, 16, 16])
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError


def noise_seed(prompt_id: str, seed: int) -> int:
    """A 63-bit generator seed derived from (prompt id, seed) by SHA-256.

    Hashing (rather than e.g. ``seed * 1000 + index``) keeps keys of different prompts
    independent and makes the seed insensitive to prompt order or sharding.
    """
    digest = hashlib.sha256(f"{prompt_id}\x1f{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_noise(prompt_id: str, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal noise of ``shape`` (e.g. ``(C, H, W)``) for one key, float32 on CPU."""
    generator = torch.Generator("cpu").manual_seed(noise_seed(prompt_id, seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def check_strings(values: object, name: str, what: str = "prompt") -> list[str]:
    """``values`` as a non-empty list of str; :class:`ConfigError` naming ``name`` otherwise.

    A bare string is refused rather than read as one item: iterating it would give one
    "prompt" per character.
    """
    if isinstance(values, str):
        raise ConfigError(
            f"'{name}' is a single string; pass a list of {what}s, e.g. [{values[:40]!r}]"
        )
    if not isinstance(values, Iterable):
        raise ConfigError(f"'{name}' is a {type(values).__name__}; pass a list of {what} strings")
    values = list(values)
    if not values:
        raise ConfigError(f"'{name}' is empty; pass at least one {what}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigError(f"'{name}[{i}]' is a {type(value).__name__}; pass {what}s as strings")
    return values


def check_seeds(seeds: object, count: int, what: str = "prompt") -> list[int]:
    """``seeds`` as ``count`` ints; :class:`ConfigError` naming the argument and the fix otherwise.

    Any integer type is a seed (``int``, numpy integers, 0-d integer tensors), negative ones
    included; ``bool`` and floats (even ``1.0``) are refused.
    """
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise ConfigError(
            f"'seeds' is a {type(seeds).__name__}; pass a list of integer seeds, one per {what}, "
            "e.g. [0]"
        )
    seeds = list(seeds)
    out = []
    for i, seed in enumerate(seeds):
        try:
            if isinstance(seed, bool):
                raise TypeError
            out.append(operator.index(seed))
        except TypeError:
            raise ConfigError(
                f"'seeds[{i}]' is {seed!r} ({type(seed).__name__}); seeds must be integers"
            ) from None
    if len(out) != count:
        raise ConfigError(f"got {count} {what}s but {len(out)} seeds; pass one seed per {what}")
    return out


def _check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise ConfigError(
            f"'shape' is a {type(shape).__name__}; pass the latent shape (C, H, W), e.g. "
            "latent_shape(pipe)"
        )
    dims = list(shape)
    try:
        if any(isinstance(d, bool) for d in dims):
            raise TypeError
        sizes = tuple(operator.index(d) for d in dims)
    except TypeError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ConfigError(
            f"'shape' is {tuple(dims)}; pass positive integer sizes (C, H, W), e.g. "
            "latent_shape(pipe)"
        )
    return sizes


def batch_noise(
    prompt_ids: Sequence[str], seeds: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """Stack :func:`initial_noise` for each key: ``(B, *shape)`` float32 on CPU.

    Raises:
        ConfigError: ``prompt_ids`` not a non-empty list of str, seeds not one integer per id,
            ``shape`` not positive ints.
    """
    prompt_ids = check_strings(prompt_ids, "prompt_ids", "prompt id")
    seeds = check_seeds(seeds, len(prompt_ids), "prompt id")
    shape = _check_shape(shape)
    return torch.stack([initial_noise(p, s, shape) for p, s in zip(prompt_ids, seeds)])


def distribution_preserving_mix(
    a: torch.Tensor, b: torch.Tensor, gamma: float | torch.Tensor
) -> torch.Tensor:
    """``sqrt(1 - gamma) * a + sqrt(gamma) * b``.

    For independent standard-normal ``a`` and ``b`` the result is standard normal for every
    ``gamma`` in [0, 1]; ``gamma`` may be a tensor broadcastable to ``a`` (per-sample mixes).
    """
    gamma = torch.as_tensor(gamma, dtype=a.dtype, device=a.device)
    if torch.any(gamma < 0) or torch.any(gamma > 1):
        raise ValueError("gamma must lie in [0, 1] for a distribution-preserving mix")
    return torch.sqrt(1 - gamma) * a + torch.sqrt(gamma) * b


@dataclass(frozen=True)
class GaussianStats:
    """Per-sample statistics of a noise batch; each field is a ``(B,)`` tensor.

    ``ks`` is the Kolmogorov-Smirnov distance between the sample's values and N(0, 1);
    for n i.i.d. normal values it is about ``0.87 / sqrt(n)`` on average.
    """

    mean: torch.Tensor
    std: torch.Tensor
    ks: torch.Tensor

    def is_gaussian(
        self, mean_tol: float = 0.1, std_tol: float = 0.1, ks_tol: float = 0.05
    ) -> torch.Tensor:
        """``(B,)`` bool: per-sample mean, std and KS distance within tolerance."""
        return (
            (self.mean.abs() <= mean_tol) & ((self.std - 1).abs() <= std_tol) & (self.ks <= ks_tol)
        )


def gaussian_stats(x: torch.Tensor) -> GaussianStats:
    """Per-sample mean, std and KS distance to N(0, 1) of ``x`` ``(B, ...)``."""
    flat = x.detach().float().flatten(1)
    n = flat.shape[1]
    values, _ = torch.sort(flat, dim=1)
    cdf = 0.5 * (1 + torch.erf(values / math.sqrt(2)))
    upper = torch.arange(1, n + 1, dtype=cdf.dtype, device=cdf.device) / n
    lower = torch.arange(0, n, dtype=cdf.dtype, device=cdf.device) / n
    ks = torch.maximum(upper - cdf, cdf - lower).amax(dim=1)
    return GaussianStats(mean=flat.mean(1), std=flat.std(1), ks=ks)


def check_finite(x: torch.Tensor, name: str = "noise") -> torch.Tensor:
    """Return ``x``; raise ``ValueError`` naming ``name`` if it holds NaN or Inf."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"{name} contains NaN or Inf (samples {bad}); draw it from "
            "noisealign.noise.initial_noise or check the policy that produced it"
        )
    return x
