"""Dry runs: replicas of the named classes, mirrored paths, cuts, refusals, and the report."""

import json
from pathlib import Path

import pytest

from noisealign.configs import parse_config
from noisealign.dry_run import mirror, replicas
from noisealign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _leave_dry_run_mode():
    yield
    from noisealign.dry_run import reset

    reset()  # these tests parse dry-run recipes without running the stage's report


def test_mirror_keeps_the_recipe_path_under_the_dry_run_folder(tmp_path):
    root = tmp_path / "dr"
    assert mirror(root, "outputs/sd15/collect") == root / "outputs/sd15/collect"
    assert mirror(root, "outputs/sd15/collect/dataset") == root / "outputs/sd15/collect/dataset"
    assert mirror(root, "/data/runs/x") == root / "data/runs/x"
    assert mirror(root, str(root / "already")) == root / "already"  # not mirrored twice


@pytest.mark.parametrize(
    "name, expected",
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline"),
        ("stabilityai/stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline"),
        ("stabilityai/stable-diffusion-3.5-large", "StableDiffusion3Pipeline"),
        ("black-forest-labs/FLUX.1-dev", "FluxPipeline"),
        ("black-forest-labs/FLUX.1-schnell", "FluxPipeline"),
    ],
)
def test_pipeline_class_of_known_ids(name, expected):
    assert replicas.pipeline_class(name) == expected


def test_pipeline_class_is_read_from_a_local_model_index(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"})
    )
    assert replicas.pipeline_class(str(folder)) == "StableDiffusionXLPipeline"
    # a diffusers class with no replica (FluxPipeline was the example until it had one)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match="its class is KandinskyPipeline.*replicas exist for"):
        replicas.pipeline_class(str(folder))


def test_unknown_ids_get_one_line_naming_the_id_and_the_fix():
    with pytest.raises(ConfigError) as info:
        replicas.pipeline_class("someone/secret-model")
    message = str(info.value)
    assert "someone/secret-model" in message and "model_index.json" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="'someone/vlm'.*config.json"):
        replicas.judge_model_type("vlm", "someone/vlm")


def test_a_flux_replica_gets_the_replicas_latent_size_and_others_keep_theirs():
    from noisealign.testing.flow_pipelines import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    flux = build_tiny_flux_pipeline()
    assert flux.default_sample_size == 128  # FluxPipeline.__init__'s, for 1024-pixel FLUX.1
    assert replicas.shrink_default_size(flux) == [128, 16]
    assert flux.default_sample_size == 16
    sd3 = build_tiny_sd3_pipeline()  # its size comes from the transformer's config: kept
    assert replicas.shrink_default_size(sd3) is None and sd3.default_sample_size == 16


@pytest.mark.parametrize(
    "model, expected",
    [
        ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl"),
        ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl"),
        ("llava-hf/llava-1.5-7b-hf", "llava"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"),
    ],
)
def test_judge_model_types_of_known_ids(model, expected):
    assert replicas.judge_model_type("vlm", model) == expected


def test_judge_model_type_prefers_the_config_on_disk(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    assert replicas.judge_model_type("vlm", str(tmp_path)) == "llava_next"


def _collect_config(tmp_path, *extra):
    from noisealign.collect import CollectConfig

    args = ["--config", str(ROOT / "recipes/sd15/collect.yaml"), "--dry_run", "true"]
    return parse_config(CollectConfig, [*args, "--dry_run_dir", str(tmp_path / "dr"), *extra])


def test_prepare_replaces_models_mirrors_paths_and_cuts_work(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's prompt path is relative to the repository
    config = _collect_config(tmp_path)
    dr = tmp_path / "dr"
    assert Path(config.output_dir) == dr / "outputs/sd15/collect"
    assert Path(config.pipeline).parent == dr / "models/pipelines"
    assert (
        json.loads((Path(config.pipeline) / "model_index.json").read_text())["_class_name"]
        == "StableDiffusionPipeline"
    )
    model = json.loads((Path(config.judge_kwargs["model"]) / "config.json").read_text())
    assert model["model_type"] == "qwen2_5_vl" and config.judge_kwargs["method"] == "concepts"
    assert config.seeds == "0,1" and config.torch_dtype in ("bfloat16", "float16")
    lines = Path(config.prompts).read_text().splitlines()
    splits = [json.loads(line)["split"] for line in lines]
    assert splits.count("train") == 8 and splits.count("eval") == 8
    assert not (ROOT / "dry_run").exists()  # nothing beside the recipe's own paths either


def test_dry_run_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "dr").mkdir()
    (tmp_path / "dr" / "report.md").write_text("real results")
    with pytest.raises(ConfigError, match="holds files a dry run did not write"):
        _collect_config(tmp_path)
    assert (tmp_path / "dr" / "report.md").read_text() == "real results"


def test_dry_run_dir_inside_the_real_output_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    real = tmp_path / "real"
    with pytest.raises(ConfigError, match="lies inside the recipe's output_dir"):
        _collect_config(tmp_path, "--output_dir", str(real), "--dry_run_dir", str(real / "dr"))
    assert not real.exists()


def test_an_input_no_dry_run_wrote_is_named(tmp_path, monkeypatch):
    from noisealign.distill import DistillConfig

    monkeypatch.chdir(ROOT)
    args = [
        "--config",
        "recipes/sd15/distill.yaml",
        "--dry_run",
        "true",
        "--dry_run_dir",
        str(tmp_path / "dr"),
    ]
    with pytest.raises(
        ConfigError,
        match="dataset 'outputs/sd15/collect/dataset' is read from .*which no dry run wrote",
    ):
        parse_config(DistillConfig, args)


def test_help_shows_dry_run(capsys):
    from noisealign.cli import main

    with pytest.raises(SystemExit):
        main(["collect", "--help"])
    assert "--dry_run" in capsys.readouterr().out


def test_dry_run_keeps_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "online")
    config = _collect_config(tmp_path)
    import os

    assert config.report_to == "wandb" and os.environ["WANDB_MODE"] == "offline"
