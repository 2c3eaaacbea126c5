"""Tiny inputs shared by the reliability suite: pipelines, a feedback dataset, reward model,
projector."""

from __future__ import annotations

import pytest
import torch

# all in the toy grammar, so the shapes judge scores every one; only one mentions 'blue'
PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle above a red square",
    "a yellow circle left of a green square",
]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A folder holding ``sd``/``sdxl`` pipelines, ``data`` (collect rows), ``reward``,
    ``projector``."""
    from noisealign.pipelines import pipeline_signature
    from noisealign.policies import NoiseProjector, NoiseProjectorConfig
    from noisealign.rewards import NoiseRewardConfig, NoiseRewardModel
    from noisealign.testing.feedback import FEEDBACK_PROMPTS, build_feedback_dataset
    from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("reliability")
    pipe = build_tiny_sd_pipeline(root / "sd")
    build_tiny_sdxl_pipeline(root / "sdxl")
    build_feedback_dataset(
        pipe, root / "data", FEEDBACK_PROMPTS, range(4), pipeline=str(root / "sd")
    )
    signature = pipeline_signature(pipe)
    torch.manual_seed(0)
    NoiseRewardModel(
        NoiseRewardConfig(
            latent_channels=4,
            text_dim=32,
            hidden_dim=16,
            depth=1,
            num_heads=2,
            mlp_ratio=2.0,
            pipeline_signature=signature,
        )
    ).save_pretrained(root / "reward")
    NoiseProjector(
        NoiseProjectorConfig(
            latent_channels=4,
            text_dim=32,
            hidden_dim=16,
            depth=1,
            num_heads=2,
            patch_size=2,
            pipeline_signature=signature,
            pipeline=str(root / "sd"),
        )
    ).save_pretrained(root / "projector")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root
