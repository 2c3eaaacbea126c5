"""The generate stage: PNGs from a projector folder, side by side on request, clear pipeline
errors."""

import pytest
import torch
from PIL import Image

from noisealign import generate
from noisealign.errors import ConfigError, PipelineError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from noisealign.pipelines import pipeline_signature
    from noisealign.policies import NoiseProjector, NoiseProjectorConfig
    from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("generate")
    pipe = build_tiny_sd_pipeline(root / "sd")
    build_tiny_sdxl_pipeline(root / "sdxl")
    torch.manual_seed(0)
    config = NoiseProjectorConfig(
        latent_channels=4,
        text_dim=32,
        hidden_dim=16,
        depth=1,
        num_heads=2,
        patch_size=2,
        pipeline_signature=pipeline_signature(pipe),
        pipeline=str(root / "sd"),
    )
    model = NoiseProjector(config)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)  # as if trained: ε′ differs from ε
    model.save_pretrained(root / "projector")
    return root


def run(root, out, *extra):
    return generate.main(
        [
            "--projector",
            str(root / "projector"),
            "--prompt",
            "a red circle",
            "a blue square",
            "--seed",
            "0",
            "1",
            "--num_inference_steps",
            "2",
            "--output_dir",
            str(out),
            *extra,
        ]
    )


def test_writes_one_png_per_prompt_and_seed(folders, tmp_path):
    paths = run(folders, tmp_path / "a")
    assert [p.name for p in paths] == [
        "000_seed0.png",
        "000_seed1.png",
        "001_seed0.png",
        "001_seed1.png",
    ]
    assert Image.open(paths[0]).size == (32, 32)
    again = run(folders, tmp_path / "b")
    assert Image.open(again[0]).tobytes() == Image.open(paths[0]).tobytes()  # deterministic


def test_side_by_side_puts_standard_left_and_projected_right(folders, tmp_path):
    plain = run(folders, tmp_path / "a")
    pairs = run(folders, tmp_path / "b", "--side_by_side", "true")
    pair = Image.open(pairs[0])
    assert pair.size == (64, 32) and pairs[0].name == "000_seed0_side_by_side.png"
    assert pair.crop((32, 0, 64, 32)).tobytes() == Image.open(plain[0]).tobytes()
    assert pair.crop((0, 0, 32, 32)).tobytes() != pair.crop((32, 0, 64, 32)).tobytes()


def test_other_pipeline_and_missing_fields_fail_clearly(folders, tmp_path):
    with pytest.raises(PipelineError, match="text_embed_dim: expected 32, got 64"):
        run(folders, tmp_path / "a", "--pipeline", str(folders / "sdxl"))
    with pytest.raises(ConfigError, match="'prompt' is required"):
        generate.main(["--projector", str(folders / "projector")])


def test_missing_or_empty_projector_folder_fails_clearly(tmp_path):
    from noisealign.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no config.json or model.safetensors"):
        generate.main(["--projector", str(tmp_path / "empty"), "--prompt", "a red circle"])
    with pytest.raises(DataError, match="cannot load projector"):
        generate.main(["--projector", str(tmp_path / "nothing"), "--prompt", "a red circle"])


@pytest.mark.parametrize(
    "recorded, cwd",
    [
        ("../sd", "elsewhere"),  # relative to the projector folder
        ("sd", "root"),  # relative to the working directory the recipe ran in
        ("sd", "elsewhere"),  # root-relative, read from another directory: found above the folder
    ],
)
def test_recorded_relative_pipeline_resolves_from_any_working_directory(
    folders, tmp_path, monkeypatch, recorded, cwd
):
    import json
    import shutil

    projector = folders / f"projector-{recorded.replace('/', '_')}-{cwd}"
    shutil.copytree(folders / "projector", projector, dirs_exist_ok=True)
    config = json.loads((projector / "config.json").read_text())
    (projector / "config.json").write_text(json.dumps({**config, "pipeline": recorded}))
    monkeypatch.chdir(folders if cwd == "root" else tmp_path)
    paths = generate.main(
        [
            "--projector",
            str(projector),
            "--prompt",
            "a red circle",
            "--seed",
            "0",
            "--num_inference_steps",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert [p.name for p in paths] == ["000_seed0.png"]
    assert Image.open(paths[0]).size == (32, 32)
