import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from noisealign.errors import PipelineError
from noisealign.pipelines import load_pipeline, resolve_dtype
from noisealign.testing.pipelines import build_tiny_sd_pipeline


def test_round_trip_keeps_weights_and_uses_ddim(tiny_sd, tiny_sd_folder):
    built = build_tiny_sd_pipeline()  # same default seed as the saved folder
    assert isinstance(tiny_sd, StableDiffusionPipeline)
    assert isinstance(tiny_sd.scheduler, DDIMScheduler)
    assert tiny_sd.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        saved, loaded = getattr(built, name).state_dict(), getattr(tiny_sd, name).state_dict()
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k], loaded[k]) for k in saved), name
    assert len(tiny_sd.tokenizer) == len(built.tokenizer)
    assert tiny_sd.scheduler.config.steps_offset == 1


def test_sdxl_round_trip(tiny_sdxl):
    assert isinstance(tiny_sdxl, StableDiffusionXLPipeline)
    assert isinstance(tiny_sdxl.scheduler, DDIMScheduler)
    assert tiny_sdxl.unet.config.addition_embed_type == "text_time"


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(PipelineError) as info:
        load_pipeline(str(tmp_path))
    assert str(info.value) == (
        f"'{tmp_path}' is not a diffusers pipeline folder (no model_index.json); "
        "pass a folder written by save_pretrained or a hub id"
    )


def test_unsupported_class_lists_supported(tmp_path):
    # a diffusers class no adapter covers (FluxPipeline was the example until FLUX was supported)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(PipelineError) as info:
        load_pipeline(str(tmp_path))
    assert str(info.value) == (
        "pipeline class 'PixArtAlphaPipeline' is not supported; supported: "
        "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline"
    )


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_missing_hub_id_offline():
    with pytest.raises(
        PipelineError, match="cannot find pipeline 'noisealign-test/does-not-exist'"
    ):
        load_pipeline("noisealign-test/does-not-exist")


def test_unknown_dtype_and_scheduler(tiny_sd_folder):
    with pytest.raises(
        PipelineError, match="unknown torch_dtype 'float64x'; use one of float32, fp32"
    ):
        load_pipeline(str(tiny_sd_folder), torch_dtype="float64x")
    with pytest.raises(PipelineError, match="unknown scheduler 'heun'; use one of ddim, euler"):
        load_pipeline(str(tiny_sd_folder), scheduler="heun")
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16


def test_scheduler_swap_keeps_config(tmp_path):
    pipe = build_tiny_sd_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", prediction_type="v_prediction"
    )
    pipe.save_pretrained(tmp_path)
    kept = load_pipeline(str(tmp_path), scheduler=None)
    assert isinstance(kept.scheduler, PNDMScheduler)
    swapped = load_pipeline(str(tmp_path), torch_dtype="bfloat16")
    assert isinstance(swapped.scheduler, DDIMScheduler)
    assert swapped.scheduler.config.timestep_spacing == "trailing"
    assert swapped.scheduler.config.prediction_type == "v_prediction"
    assert swapped.unet.dtype == torch.bfloat16
