"""Tiny SD and SDXL pipelines, built once per session."""

from __future__ import annotations

import pytest

from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def tiny_sd():
    """Shared across tests: do not mutate."""
    return build_tiny_sd_pipeline()


@pytest.fixture(scope="session")
def tiny_sdxl():
    return build_tiny_sdxl_pipeline()


@pytest.fixture(scope="session", params=["sd", "sdxl"])
def tiny_pipe(request: pytest.FixtureRequest, tiny_sd, tiny_sdxl):
    return tiny_sd if request.param == "sd" else tiny_sdxl
