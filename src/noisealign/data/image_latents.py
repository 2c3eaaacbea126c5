"""Image latents of a collect dataset: the VAE latent of one of its images, standardised.

Under standard Gaussian noise the judge's verdict is a nearly chaotic function of ε: the
coarse pattern that decides the layout has a projection of about one standard deviation on
any direction (docs/distill.md). The standardised VAE latent z of an image the pipeline made
for the prompt carries that image's layout; mixed into noise,

    √(1−γ)·ε + √γ·z,

it moves the noise far along layout directions (SDEdit from pure noise, in effect). Two
stages use it: ``train_projector`` draws its candidates around the reference with these
latents (``candidate_images``, :mod:`noisealign.policies.candidates`) and ``image_npd`` makes
golden-noise targets of the accepted images.

The images come from an earlier collect run with ``save_images: true`` (the pipeline's own
outputs), so nothing here is specific to a model or a world. Choices are keyed by
(prompt id, seed): the same key gets the same image on any number of processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch

from ..errors import DataError
from ..noise import noise_seed


class ImageLatents:
    """Images of an earlier collect dataset, encoded on demand by the pipeline's VAE."""

    def __init__(self, dataset: str | Path, pipe: Any) -> None:
        path = Path(dataset)
        if not (path / "dataset_info.json").is_file():
            raise DataError(
                f"image dataset '{path}' is not a saved dataset; point it at "
                "<an earlier collect's output_dir>/dataset"
            )
        table = datasets.load_from_disk(str(path))
        self.dataset = table  # every column, for callers that need more than the images
        missing = [c for c in ("prompt_id", "image") if c not in table.column_names]
        if missing:
            raise DataError(
                f"image dataset '{path}' lacks column(s) {missing}; "
                "collect it with save_images: true"
            )
        self.table = table.select_columns(["prompt_id", "image"])
        self.scores = (
            torch.tensor(table["overall"], dtype=torch.float32)
            if "overall" in table.column_names
            else None
        )
        self.by_prompt: dict[str, list[int]] = {}
        for index, pid in enumerate(self.table["prompt_id"]):
            self.by_prompt.setdefault(pid, []).append(index)
        self.pipe = pipe
        self._latents: dict[tuple, torch.Tensor] = {}

    def choose(self, prompt_id: str, seed: int) -> int:
        """The source row of one key: an image of the same prompt when there is one, else any."""
        # the stream's name predates this module (its first use mixed images into collect rows);
        # kept so every key still picks the image it always did
        rng = random.Random(noise_seed(f"{prompt_id}\x1fexplore", seed))
        pool = self.by_prompt.get(prompt_id) or range(len(self.table))
        return pool[rng.randrange(len(pool))]

    @torch.no_grad()
    def latent(self, index: int, shape: Sequence[int], cache: bool = True) -> torch.Tensor:
        """The standardised VAE latent (C, H, W) of source row ``index``, float32 on CPU.

        The image is resized to the latent size × the VAE scale factor first (as diffusers'
        img2img pipelines do), so a source of another resolution still fits. With ``cache``
        the latent is kept for the next call (train_projector reuses images); callers that
        use each image once pass ``cache=False``.
        """
        key = (index, tuple(int(s) for s in shape))
        if key not in self._latents:
            vae = self.pipe.vae
            height, width = (int(s) * self.pipe.vae_scale_factor for s in shape[1:])
            pixels = self.pipe.image_processor.preprocess(
                self.table[index]["image"].convert("RGB"), height=height, width=width
            )
            pixels = pixels.to(vae.device, vae.dtype)
            z = vae.encode(pixels).latent_dist.mean[0].float().cpu()
            z = (z - z.mean()) / z.std().clamp_min(1e-6)
            if not cache:
                return z
            self._latents[key] = z
        return self._latents[key]

    def fields(
        self, prompt_ids: Sequence[str], seeds: Sequence[int], shape: Sequence[int]
    ) -> torch.Tensor:
        """(B, C, H, W) standardised latents of the images :meth:`choose` picks for these keys."""
        return torch.stack(
            [self.latent(self.choose(p, s), shape) for p, s in zip(prompt_ids, seeds)]
        )

    def verdicts(self, prompt_ids: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        """(B,) the judge's stored overall score of the image :meth:`choose` picks for each key."""
        if self.scores is None:
            raise DataError(
                "the image dataset has no 'overall' column; use a collect stage dataset"
            )
        return self.scores[[self.choose(p, s) for p, s in zip(prompt_ids, seeds)]]
