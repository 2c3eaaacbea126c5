"""Tiny offline judges: random VLMs and CLIP saved once per session, loaded per test module."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from noisealign.testing.vlms import BUILDERS, build_tiny_clip, build_tiny_vlm

PROMPTS = [
    "a red circle left of a blue square",
    "a cat",
    "two dogs and a yellow tree, a small house",
]


@pytest.fixture(scope="session")
def tiny_vlm_folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {arch: build_tiny_vlm(arch, root / arch) for arch in BUILDERS}


@pytest.fixture(scope="session")
def tiny_clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three different images of different sizes: smooth gradients plus noise."""
    rng = np.random.default_rng(0)
    out = []
    for height, width in [(32, 32), (48, 64), (40, 40)]:
        ys, xs = np.mgrid[0:height, 0:width]
        base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 200
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(pixels))
    return out


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    return list(PROMPTS)
