"""CLIPScore as a judge, with a differentiable tensor path for gradient-based baselines.

Score definition (CLIPScore, Hessel et al. 2021, arXiv 2104.08718):
``clamp(scale · cos(E_image, E_text), 0, 1)`` with ``scale = 2.5`` by default. The overall
score uses the whole prompt as the text; each concept is scored the same way with its own
text, and its score lands on its character spans. CLIP has no token-level signal of its
own, so the part scores are exactly the concept scores.

:meth:`CLIPJudge.score_tensor` preprocesses images in torch (resize the shortest edge,
centre crop, normalise: the steps of ``CLIPImageProcessor``) so that the score is
differentiable with respect to the pixels; :meth:`CLIPJudge.score` goes through the model's
own PIL image processor and agrees with it up to resampling differences.

Example:
    >>> judge = CLIPJudge("openai/clip-vit-large-patch14")  # doctest: +SKIP
    >>> judge.score([image], ["a red circle"])[0].overall  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from ..errors import JudgeError
from .base import Concept, Feedback
from .concepts import resolve_concepts
from .vlm import DTYPES


class CLIPJudge:
    """CLIP image-text similarity judge.

    Args:
        model: hub id or local folder of a ``CLIPModel`` with tokenizer and image processor.
        device: torch device; ``None`` is this process's (``accelerate.PartialState().device``).
        torch_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        scale: CLIPScore's weight w; cosines above ``1 / scale`` saturate at 1.
    """

    def __init__(
        self,
        model: str,
        device: str | None = None,
        torch_dtype: str = "float32",
        scale: float = 2.5,
    ) -> None:
        if torch_dtype not in DTYPES:
            raise JudgeError(
                f"CLIPJudge torch_dtype must be one of {sorted(DTYPES)}, got '{torch_dtype}'"
            )
        # PartialState is this rank's device once an Accelerator exists (cuda:<rank> on
        # 8 GPUs, not cuda:0), and the CPU without a GPU; stages build judges after their
        # Accelerator, because a PartialState made first ignores ACCELERATE_USE_CPU
        self.device = torch.device(device or PartialState().device)
        self.scale = scale
        self.model = (
            CLIPModel.from_pretrained(model, dtype=DTYPES[torch_dtype]).to(self.device).eval()
        )
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.image_processor = AutoImageProcessor.from_pretrained(model)
        processor = self.image_processor
        self._resize, self._crop = (
            processor.size.shortest_edge,
            (processor.crop_size.height, processor.crop_size.width),
        )
        self._mean = torch.tensor(processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(processor.image_std, device=self.device).view(1, 3, 1, 1)
        self.name = f"clip:{Path(model.rstrip('/')).name}"

    def __repr__(self) -> str:
        return f"CLIPJudge(name={self.name!r}, scale={self.scale}, device={self.device})"

    def _text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings; texts longer than CLIP's context are truncated."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(
            self.device
        )
        with torch.no_grad():
            features = self.model.get_text_features(**tokens).pooler_output
        return F.normalize(features.float(), dim=-1)

    def _image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.get_image_features(
            pixel_values=pixel_values.to(self.model.dtype)
        ).pooler_output
        return F.normalize(features.float(), dim=-1)

    def _clip_score(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return (self.scale * (image_emb * text_emb).sum(-1)).clamp(0.0, 1.0)

    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, 3, crop_h, crop_w) normalised pixel values,
        differentiably.

        Bicubic with antialiasing is the closest torch match to the PIL resampling of
        ``CLIPImageProcessor``; the output size follows its shortest-edge rule.
        """
        height, width = images.shape[-2:]
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self._resize, int(self._resize * long / short)
        size = (new_short, new_long) if height <= width else (new_long, new_short)
        resized = F.interpolate(
            images.float(), size=size, mode="bicubic", align_corners=False, antialias=True
        )
        resized = resized.clamp(0.0, 1.0)  # PIL clips bicubic overshoot to the pixel range
        top, left = (size[0] - self._crop[0]) // 2, (size[1] - self._crop[1]) // 2
        cropped = resized[..., top : top + self._crop[0], left : left + self._crop[1]]
        return (cropped - self._mean) / self._std

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIPScore of (B, 3, H, W) float images in [0, 1] against B prompts: (B,) float32,
        differentiable."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"got {images.shape[0]} images for {len(prompts)} prompts")
        image_emb = self._image_embeddings(self.preprocess_tensor(images.to(self.device)))
        return self._clip_score(image_emb, self._text_embeddings(prompts))

    @torch.no_grad()
    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        concepts: Sequence[list[Concept] | None] | None = None,
    ) -> list[Feedback]:
        """Score B images against B prompts (overall) and their concepts (parts)."""
        resolved = resolve_concepts(images, prompts, concepts)
        pixels = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")[
            "pixel_values"
        ]
        image_emb = self._image_embeddings(pixels.to(self.device))
        owners = [i for i, cs in enumerate(resolved) for _ in [None, *cs]]
        texts = [t for p, cs in zip(prompts, resolved) for t in [p, *(c.text for c in cs)]]
        scores = self._clip_score(image_emb[owners], self._text_embeddings(texts)).tolist()
        feedback, cursor = [], 0
        for sample_concepts in resolved:
            overall, concept_scores = (
                scores[cursor],
                scores[cursor + 1 : cursor + 1 + len(sample_concepts)],
            )
            cursor += 1 + len(sample_concepts)
            scored = [
                Concept(c.text, c.kind, list(c.spans), s)
                for c, s in zip(sample_concepts, concept_scores)
            ]
            feedback.append(Feedback(overall=overall, concepts=scored))
        return feedback
