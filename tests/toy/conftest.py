"""Fixtures of the toy-world tests: ground-truth renders and the judge."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from noisealign.toy.grammar import all_prompts
from noisealign.toy.judge import ShapesJudge
from noisealign.toy.render import render_prompt


@pytest.fixture(scope="session")
def judge() -> ShapesJudge:
    return ShapesJudge()


@pytest.fixture(scope="session")
def renders() -> list[tuple[str, Image.Image]]:
    """1,200 ground-truth renders: every prompt of the grammar at least twice, random placements."""
    rng = random.Random(1234)
    prompts = all_prompts() * 2
    prompts += [rng.choice(all_prompts()) for _ in range(1200 - len(prompts))]
    return [(p, render_prompt(p, rng)) for p in prompts]
