"""Where train_projector's K candidates come from: one :class:`CandidateSource` protocol.

Candidate j of sample b is √(1−γ)·f_ref(ε, e) + √γ·ξ_bj (:func:`draw_candidates`); a source
gives the unit-variance fields ξ, keyed by (prompt id, seed, j) so a resumed run and a run on
any number of processes draw the same candidates:

- :class:`WhiteNoise` — ξ ~ N(0, I);
- :class:`ImageCandidates` — ξ is the standardised VAE latent of one of a collect dataset's
  images of the same prompt (:mod:`noisealign.data.image_latents`), so the K candidates differ
  in layout the way images do. It also knows each candidate's collected verdict (the judge's
  score of its source image), which ``rank_by: verdicts`` ranks by.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..data.image_latents import ImageLatents
from ..errors import DataError
from ..noise import batch_noise, distribution_preserving_mix


class CandidateSource(Protocol):
    """Gives the fields ξ that :func:`draw_candidates` mixes into the reference."""

    def fields(
        self, ids: Sequence[str], seeds: Sequence[int], k: int, shape: Sequence[int]
    ) -> torch.Tensor:
        """(B·K, *shape) unit-variance fields; row b·K + j is candidate j of sample b."""
        ...


class WhiteNoise:
    """ξ_bj ~ N(0, I), keyed by (prompt id + candidate j, the sample's seed)."""

    def fields(
        self, ids: Sequence[str], seeds: Sequence[int], k: int, shape: Sequence[int]
    ) -> torch.Tensor:
        keys = [f"{pid}|candidate-{j}" for pid in ids for j in range(k)]
        return batch_noise(keys, [s for s in seeds for _ in range(k)], shape)


class ImageCandidates:
    """ξ_bj is the standardised latent of the image of key (prompt id, seed·K + j)."""

    def __init__(self, dataset: str, pipe: Any) -> None:
        self.images = ImageLatents(dataset, pipe)

    def check_prompts(self, prompt_ids: Sequence[str]) -> None:
        """Refuse prompts the dataset has no image of (their candidates would be other prompts')."""
        unknown = sorted(set(prompt_ids) - set(self.images.by_prompt))
        if unknown:
            raise DataError(
                f"'candidate_images' has no image of {len(unknown)} prompt(s), e.g. "
                f"{unknown[0]!r}; collect them with save_images: true"
            )

    @staticmethod
    def keys(ids: Sequence[str], seeds: Sequence[int], k: int) -> tuple[list[str], list[int]]:
        """The (prompt id, seed) image keys of the B·K candidates (sample-major)."""
        return [p for p in ids for _ in range(k)], [s * k + j for s in seeds for j in range(k)]

    def fields(
        self, ids: Sequence[str], seeds: Sequence[int], k: int, shape: Sequence[int]
    ) -> torch.Tensor:
        return self.images.fields(*self.keys(ids, seeds, k), shape)

    def verdicts(self, ids: Sequence[str], seeds: Sequence[int], k: int) -> torch.Tensor:
        """(B·K,) the collected judge score of each candidate's source image."""
        return self.images.verdicts(*self.keys(ids, seeds, k))


def candidate_source(
    candidate_images: str | None, pipe: Any, prompt_ids: Sequence[str]
) -> CandidateSource:
    """:class:`ImageCandidates` of the ``candidate_images`` dataset, else :class:`WhiteNoise`."""
    if not candidate_images:
        return WhiteNoise()
    source = ImageCandidates(candidate_images, pipe)
    source.check_prompts(prompt_ids)
    return source


def draw_candidates(
    source: CandidateSource,
    reference: torch.Tensor,
    ids: Sequence[str],
    seeds: Sequence[int],
    k: int,
    gamma: float,
) -> torch.Tensor:
    """(B, K, C, H, W): √(1−γ)·f_ref(ε, e) + √γ·ξ_k with the source's fields ξ."""
    xi = source.fields(ids, seeds, k, reference.shape[1:])
    xi = xi.view(len(ids), k, *reference.shape[1:]).to(reference.device, reference.dtype)
    return distribution_preserving_mix(reference[:, None], xi, gamma)
