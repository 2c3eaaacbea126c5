"""Tiny SD / SDXL pipelines and a synthetic feedback dataset for the reward model tests."""

import pytest

from noisealign.testing.feedback import FEEDBACK_PROMPTS

PROMPTS = list(FEEDBACK_PROMPTS)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    return build_tiny_sd_pipeline(folder), str(folder)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    return build_tiny_sdxl_pipeline(folder), str(folder)


@pytest.fixture(scope="session")
def feedback_dir(tiny_sd, tmp_path_factory):
    from noisealign.testing.feedback import build_feedback_dataset

    pipe, folder = tiny_sd
    out = tmp_path_factory.mktemp("feedback") / "dataset"
    build_feedback_dataset(pipe, out, PROMPTS, range(4), save_noise=True, pipeline=folder)
    return str(out)
