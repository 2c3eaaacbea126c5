"""Judges whose scores the baseline tests control (a module of its own: several test folders have a
conftest)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from noisealign.judges.base import Feedback


class ScriptedJudge:
    """Returns the given scores in call order (one per image) and records what it saw."""

    name = "scripted"

    def __init__(self, scores: Sequence[float]) -> None:
        self.scores, self.seen = list(scores), []

    def score(self, images, prompts, concepts=None) -> list[Feedback]:
        self.seen += list(zip(images, prompts))
        return [Feedback(overall=self.scores.pop(0)) for _ in images]


class BrightnessJudge:
    """Differentiable: a sigmoid of the image's weighted mean, with fixed per-pixel weights."""

    name = "brightness"

    def __init__(self, size: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.randn(1, 3, size, size, generator=generator)

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(20 * ((images - 0.5) * self.weight).mean(dim=(1, 2, 3)))

    def score(self, images: Sequence[Image.Image], prompts, concepts=None) -> list[Feedback]:
        pixels = torch.stack([pil_to_tensor(im) for im in images])
        return [Feedback(overall=float(s)) for s in self.score_tensor(pixels, prompts)]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(
        2, 0, 1
    )
