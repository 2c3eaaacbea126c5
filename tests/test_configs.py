import dataclasses
import importlib
import json
import math
import typing
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


# latent values n of each real model (4 x 64 x 64, 4 x 128 x 128, 16 x 128 x 128 for SD3-medium
# and FLUX.1 at 1024 px), for the RPO balance below
REAL_PROJECTOR_RECIPES = {
    "sd15": 4 * 64 * 64,
    "sdxl": 4 * 128 * 128,
    "sd3": 16 * 128 * 128,
    "flux": 16 * 128 * 128,
}


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


# ---- value limits: declared in each field's metadata, applied by BaseConfig.__post_init__ ----
# the smallest valid recipe of each stage, beyond output_dir
STAGE_REQUIRED = {
    "collect": {"pipeline": "p", "judge": "shapes", "prompts": "x.txt"},
    "collect_npd": {"pipeline": "p", "judge": "shapes", "prompts": "x.txt"},
    "image_npd": {"dataset": "d", "pipeline": "p"},
    "distill": {"dataset": "d", "pipeline": "p"},
    "pretrain": {},
    "train_projector": {"pipeline": "p", "reward_model": "r", "prompts": "x.txt"},
    "train_npnet": {"pipeline": "p", "dataset": "d"},
    "generate": {"projector": "q", "prompt": ["a red circle"]},
    "evaluate": {
        "pipeline": "p",
        "prompt_sets": {"p": "x.txt"},
        "judges": ["shapes"],
        "methods": {"standard": {"type": "standard"}},
    },
}


def stage_config(stage):
    return importlib.import_module(STAGES[stage]).CONFIG_CLASS


def cli_args(stage, **overrides):
    """``--field value`` flags of the smallest valid recipe of ``stage``, with ``overrides``."""
    args = []
    for name, value in {"output_dir": "out", **STAGE_REQUIRED[stage], **overrides}.items():
        if isinstance(value, dict):
            args += [f"--{name}", json.dumps(value)]
        elif isinstance(value, list):
            args += [f"--{name}", *map(str, value)]
        else:
            args += [f"--{name}", str(value)]
    return args


def numeric_fields():
    """(stage, field, its annotation) of every int / float field (or list of them) of every stage."""
    cases = []
    for stage in STAGES:
        config_cls = stage_config(stage)
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            types_ = set(typing.get_args(hints[f.name])) | {hints[f.name]}
            items = {a for t in types_ for a in typing.get_args(t)} if typing.get_origin(hints[f.name]) is list else set()  # fmt: skip
            if types_ & {int, float} or items & {int, float}:
                cases.append(pytest.param(stage, f.name, hints[f.name], id=f"{stage}.{f.name}"))
    return cases


def test_every_stage_config_is_covered():
    from noisealign.configs import BaseConfig

    assert set(STAGE_REQUIRED) == set(STAGES)
    for stage in STAGES:
        stage_config(stage)
    stage_classes = {stage_config(stage) for stage in STAGES}
    assert set(BaseConfig.__subclasses__()) <= stage_classes, "a BaseConfig that no stage uses"
    for stage in STAGES:  # the smallest recipes are valid
        assert stage_config(stage)(output_dir="out", **STAGE_REQUIRED[stage]).output_dir == "out"


@pytest.mark.parametrize("stage, name, annotation", numeric_fields())
def test_every_numeric_field_refuses_nan_and_inf(stage, name, annotation):
    config_cls = stage_config(stage)
    is_list = typing.get_origin(annotation) is list
    for bad in (math.nan, math.inf, -math.inf):
        value = [bad] if is_list else bad
        with pytest.raises(ConfigError, match=rf"^recipe field '{name}' .*") as exc:
            config_cls(output_dir="out", **{**STAGE_REQUIRED[stage], name: value})
        assert "\n" not in str(exc.value)


def test_limit_message_is_one_line_naming_field_value_and_fix():
    with pytest.raises(ConfigError) as exc:
        parse_config(stage_config("distill"), cli_args("distill", learning_rate="nan"))
    assert str(exc.value) == (
        "recipe field 'learning_rate' must be > 0, got nan; fix it in the YAML or on the command line"
    )


@pytest.mark.parametrize(
    "stage, name, value, message",
    [
        ("distill", "learning_rate", 0, r"must be > 0, got 0.0"),
        ("distill", "learning_rate", -1, r"must be > 0, got -1.0"),
        ("train_projector", "learning_rate", 0, r"must be > 0, got 0.0"),
        ("train_npnet", "learning_rate", "inf", r"must be finite and > 0, got inf"),
        ("pretrain", "unet_lr", -0.001, r"must be > 0, got -0.001"),
        ("distill", "weight_decay", -0.1, r"must be >= 0, got -0.1"),
        ("distill", "max_steps", 0, r"must be >= 1, got 0"),
        ("train_projector", "max_steps", 0, r"must be >= 1, got 0"),
        ("train_npnet", "max_steps", 0, r"must be >= 1, got 0"),
        ("train_npnet", "save_steps", 0, r"must be >= 1, got 0"),
        ("distill", "logging_steps", 0, r"must be >= 1, got 0"),
        ("distill", "eval_fraction", 1.5, r"must be in \(0, 1\), got 1.5"),
        ("train_npnet", "eval_fraction", 0, r"must be in \(0, 1\), got 0.0"),
        ("pretrain", "cfg_dropout", 1, r"must be in \[0, 1\), got 1.0"),
        ("train_projector", "candidate_gamma", 1.5, r"must be in \(0, 1\], got 1.5"),
        ("image_npd", "gamma", 0, r"must be in \(0, 1\], got 0.0"),
        ("train_projector", "sigma", 0, r"must be > 0, got 0.0"),
        ("collect", "guidance_scale", -1, r"must be >= 0, got -1.0"),
        ("evaluate", "guidance_scale", "nan", r"must be >= 0, got nan"),
        ("collect_npd", "guidance_invert", -1, r"must be >= 0, got -1.0"),
        ("evaluate", "max_prompts", 0, r"must be >= 1, got 0"),
        ("collect", "height", 36, r"must be >= 8 and a multiple of 8, got 36"),
        ("generate", "width", 0, r"must be >= 8 and a multiple of 8, got 0"),
        ("collect", "seeds", "3:3", r"is not a usable seed list: seeds '3:3' selects no seed"),
        ("evaluate", "seeds", "a,b", r"is not a usable seed list: seeds 'a,b' is not a comma"),
        ("distill", "input_kind", "noise", r"must be one of 'latent', 'x0', got 'noise'"),
        ("evaluate", "torch_dtype", "float64", r"must be one of 'float32', 'float16', 'bfloat16'"),
        ("collect", "num_threads", 0, r"must be >= 1, got 0"),
    ],
)
def test_out_of_range_values_are_refused(stage, name, value, message):
    with pytest.raises(
        ConfigError, match=rf"^recipe field '{name}' {message}.*; fix it in the YAML"
    ):
        parse_config(stage_config(stage), cli_args(stage, **{name: value}))


def test_required_fields_and_empty_seed_lists():
    with pytest.raises(
        ConfigError, match=r"^recipe field 'reward_model' is required: .*--reward_model"
    ):
        stage_config("train_projector")(output_dir="o", pipeline="p", prompts="x.txt")
    with pytest.raises(ConfigError, match=r"^recipe field 'seed' is required"):
        stage_config("generate")(output_dir="o", projector="q", prompt=["a"], seed=[])
    with pytest.raises(ConfigError, match=r"^recipe field 'judges' is required"):
        stage_config("evaluate")(output_dir="o", **{**STAGE_REQUIRED["evaluate"], "judges": []})


def test_limits_use_known_metadata_keys_and_stay_out_of_argparse():
    from noisealign.configs import LIMIT_KEYS

    for stage in STAGES:
        for f in dataclasses.fields(stage_config(stage)):
            unknown = set(f.metadata) - {"help", *LIMIT_KEYS}
            assert not unknown, f"{stage}.{f.name}: unknown metadata keys {unknown}"
    # argparse would refuse a CLI value that its own 'choices' lacks with another message
    with pytest.raises(ConfigError, match=r"^recipe field 'torch_dtype' must be one of"):
        parse_config(stage_config("collect"), cli_args("collect", torch_dtype="int8"))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("limits")
    build_tiny_sd_pipeline(root / "sd")
    (root / "prompts.txt").write_text("a red circle\n")
    return root


@pytest.mark.parametrize("stage", ["collect", "collect_npd"])
@pytest.mark.parametrize("height, vae_scale_factor", [(36, None), (40, 16)])
def test_collect_refuses_an_image_size_before_writing_recipe_json(
    tiny_sd, tmp_path, monkeypatch, height, vae_scale_factor, stage
):
    """36 is no multiple of 8 (config time); 40 is none of a VAE factor 16 (pipeline check)."""
    import importlib

    import noisealign.pipelines

    collect = importlib.import_module(f"noisealign.{stage}")

    if vae_scale_factor:
        load = noisealign.pipelines.load_pipeline

        def load_with_factor(*args, **kwargs):
            pipe = load(*args, **kwargs)
            pipe.vae_scale_factor = vae_scale_factor
            return pipe

        monkeypatch.setattr(noisealign.pipelines, "load_pipeline", load_with_factor)
    out = tmp_path / "out"
    args = ["--pipeline", str(tiny_sd / "sd"), "--judge", "shapes", "--prompts",
            str(tiny_sd / "prompts.txt"), "--seeds", "0:1", "--num_inference_steps", "2",
            "--report_to", "none", "--output_dir", str(out), "--height", str(height)]  # fmt: skip
    with pytest.raises(ConfigError, match=rf"{height}"):
        collect.main(args)
    assert not (out / "recipe.json").exists()
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_help_shows_the_limits(capsys):
    with pytest.raises(SystemExit):
        parse_config(stage_config("distill"), ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "AdamW peak learning rate. [> 0]" in text
    assert "[one of latent, x0]" in text


def test_a_tab_in_the_yaml_names_the_line_and_the_tab(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: x\njudge_kwargs:\n\tmodel: y\n")
    with pytest.raises(
        ConfigError, match=r"r.yaml, line 3, column 1: .*a tab: YAML indents with spaces"
    ):
        parse_config(stage_config("collect"), ["--config", str(recipe)])


def test_field_docstrings_become_help_and_list_defaults_are_copied(capsys):
    from noisealign.configs import BaseConfig, arg

    @dataclasses.dataclass
    class Recipe(BaseConfig):
        steps: int = arg(4, min=1)
        """How many steps the
        recipe takes."""
        tags: list[str] = arg(["a"])
        """Tags of the run."""

    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    assert fields["steps"].metadata == {"min": 1, "help": "How many steps the recipe takes."}
    assert fields["tags"].metadata["help"] == "Tags of the run."
    first, second = Recipe(output_dir="o"), Recipe(output_dir="o")
    first.tags.append("b")
    assert second.tags == ["a"]
    with pytest.raises(ConfigError, match=r"^recipe field 'steps' must be >= 1, got 0"):
        Recipe(output_dir="o", steps=0)
    with pytest.raises(SystemExit):
        parse_config(Recipe, ["--help"])
    assert "How many steps the recipe takes. [>= 1]" in " ".join(capsys.readouterr().out.split())


def test_arg_refuses_an_unknown_limit():
    from noisealign.configs import arg

    with pytest.raises(TypeError, match=r"unknown field limits \['maximum'\]"):
        arg(1, maximum=3)
