"""Tiny SD and SDXL pipelines, built once per session, saved and loaded back with load_pipeline."""

from pathlib import Path

import pytest
import torch

from noisealign.pipelines import load_pipeline
from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core CPU, 2 threads made generate 10x
    slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "tiny_sd"
    build_tiny_sd_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "tiny_sdxl"
    build_tiny_sdxl_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_folder: Path):
    """Shared across tests: do not mutate."""
    return load_pipeline(str(tiny_sd_folder))


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_folder: Path):
    """Shared across tests: do not mutate."""
    return load_pipeline(str(tiny_sdxl_folder))


@pytest.fixture(scope="session", params=["sd", "sdxl"])
def tiny_pipe(request: pytest.FixtureRequest, tiny_sd, tiny_sdxl):
    """Each tiny pipeline in turn, for behaviour both families must share."""
    return tiny_sd if request.param == "sd" else tiny_sdxl
