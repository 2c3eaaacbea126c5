import importlib
from pathlib import Path

import pytest
import yaml

from noisealign.cli import STAGES
from noisealign.collect import CollectConfig
from noisealign.configs import parse_config
from noisealign.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


BASE = "pipeline: p\njudge: shapes\nprompts: x.txt\noutput_dir: out\n"


def test_every_shipped_recipe_parses():
    assert RECIPES, "no recipes found"
    stage_recipes = 0
    for path in RECIPES:
        if "accelerate_configs" in path.parts:
            from accelerate.commands.config.config_args import ClusterConfig

            assert ClusterConfig.from_yaml_file(str(path)).distributed_type is not None
            continue
        assert path.stem in STAGES, (
            f"{path}: recipes are named after their stage ({', '.join(STAGES)})"
        )
        module = importlib.import_module(STAGES[path.stem])
        config = parse_config(module.CONFIG_CLASS, ["--config", str(path)])
        assert config.output_dir
        header = path.read_text().splitlines()[0]
        assert header.startswith("#"), (
            f"{path}: the first line should be a comment with the launch command"
        )
        stage_recipes += 1
    assert stage_recipes >= 3


def test_yaml_values_and_cli_overrides(tmp_path):
    path = write(tmp_path, BASE + "judge_kwargs: {a: 1}\nseeds: [1, 2]\nguidance_scale: 3\n")
    config = parse_config(
        CollectConfig, ["--config", path, "--output_dir", "o2", "--judge_kwargs", '{"b": 2}']
    )
    assert config.output_dir == "o2" and config.judge_kwargs == {"b": 2}
    assert config.seeds == "1,2" and config.guidance_scale == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "batch_sizee: 4\n",
            r"Unknown arguments from config file: \['--batch_sizee', '4'\]; known fields: .*batch_size",
        ),
        ("batch_size: 1.5\n", "recipe field 'batch_size' must be int, got float 1.5"),
        ("save_images: 3\n", "recipe field 'save_images' must be bool, got int 3"),
        ("judge_kwargs: [1]\n", "recipe field 'judge_kwargs' must be dict"),
        ("batch_size: 0\n", "recipe field 'batch_size' must be >= 1"),
        (
            "torch_dtype: float8\n",
            "recipe field 'torch_dtype' must be one of 'float32', 'float16', 'bfloat16', got 'float8'",
        ),
        (
            "report_to: tensorboardx\n",
            "recipe field 'report_to' must be one of 'wandb', 'none', got 'tensorboardx'",
        ),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(CollectConfig, ["--config", write(tmp_path, BASE + extra)])


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="'judge' is required"):
        parse_config(
            CollectConfig, ["--config", write(tmp_path, "pipeline: p\nprompts: x\noutput_dir: o\n")]
        )
    with pytest.raises(ConfigError, match="'output_dir' is required"):
        parse_config(
            CollectConfig, ["--config", write(tmp_path, "pipeline: p\njudge: j\nprompts: x\n")]
        )
    with pytest.raises(ConfigError, match="recipe file 'nope.yaml' does not exist"):
        parse_config(CollectConfig, ["--config", "nope.yaml"])
    with pytest.raises(ConfigError, match="cannot read the recipe"):
        parse_config(CollectConfig, ["--config", write(tmp_path, "pipeline: [unclosed\n")])


def test_every_field_is_documented():
    import dataclasses

    for module_name in STAGES.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        for f in dataclasses.fields(module.CONFIG_CLASS):
            assert f.metadata.get("help"), f"{module_name}: field '{f.name}' has no help"


def test_yaml_env_block_is_not_a_field(tmp_path):
    # `env:` sets environment variables (TrlParser) and must not be reported as unknown
    config = parse_config(
        CollectConfig, ["--config", write(tmp_path, BASE + "env:\n  NOISEALIGN_TEST_ENV: '1'\n")]
    )
    assert config.judge == "shapes"
    assert yaml.safe_load(Path(write(tmp_path, BASE)).read_text())["judge"] == "shapes"


# latent values n of each real model (4 x 64 x 64, 4 x 128 x 128), for the RPO balance below
REAL_PROJECTOR_RECIPES = {"sd15": 4 * 64 * 64, "sdxl": 4 * 128 * 128}


@pytest.mark.parametrize("model", sorted(REAL_PROJECTOR_RECIPES))
def test_real_projector_recipes_carry_the_toy_lessons_and_a_buildable_judge(model, tmp_path):
    from noisealign.judges import build_judge
    from noisealign.testing.vlms import build_tiny_clip
    from noisealign.train_projector import TrainProjectorConfig

    path = ROOT / "recipes" / model / "train_projector.yaml"
    config = parse_config(TrainProjectorConfig, ["--config", str(path)])
    # the toy world learned only with the RPO term, at 2*alpha/(beta*n) ~ 2 (docs/method.md)
    assert config.rpo_alpha > 0
    assert 1.5 < 2 * config.rpo_alpha / (config.beta * REAL_PROJECTOR_RECIPES[model]) < 2.5
    assert config.judge == "clip" and config.judge_kwargs.get("model")
    # every other judge argument of the recipe is one the factory takes
    tiny = str(build_tiny_clip(tmp_path / "clip"))
    judge = build_judge(config.judge, **{**config.judge_kwargs, "model": tiny})
    assert judge.name == "clip:clip"


def test_shipped_recipes_with_a_model_judge_name_its_model():
    for path in RECIPES:
        if path.stem not in ("collect", "collect_npd", "train_projector"):
            continue
        module = importlib.import_module(STAGES[path.stem])
        config = parse_config(module.CONFIG_CLASS, ["--config", str(path)])
        if config.judge in ("clip", "vlm"):  # their factories require 'model'
            assert config.judge_kwargs.get("model"), f"{path}: judge '{config.judge}' needs judge_kwargs.model"  # fmt: skip
