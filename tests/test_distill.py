"""The distill stage end to end on a tiny SD pipeline and a synthetic feedback dataset."""

import json
import shutil
from pathlib import Path

import pytest

from noisealign import distill
from noisealign.errors import ConfigError, DataError, PipelineError
from noisealign.rewards import NoiseRewardModel, load_reward_model
from noisealign.testing.feedback import FEEDBACK_PROMPTS

PROMPTS = list(FEEDBACK_PROMPTS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from noisealign.testing.feedback import build_feedback_dataset
    from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("distill")
    pipe = build_tiny_sd_pipeline(root / "sd")
    build_tiny_sdxl_pipeline(root / "sdxl")
    build_feedback_dataset(pipe, root / "data", PROMPTS, range(4), pipeline=str(root / "sd"))
    return root


def args(root, out, *extra):
    return [
        "--dataset",
        str(root / "data"),
        "--pipeline",
        str(root / "sd"),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--eval_steps",
        "2",
        "--logging_steps",
        "1",
        "--prompts_per_batch",
        "2",
        "--warmup_steps",
        "1",
        "--eval_fraction",
        "0.34",
        "--learning_rate",
        "1e-3",
        "--model_kwargs",
        '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}',
        *extra,
    ]


def test_distill_saves_a_self_describing_folder(tiny, tmp_path):
    result = distill.main(args(tiny, tmp_path / "out"))
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= {
        p.name for p in out.iterdir()
    }
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert all(h["pairs"] > 0 for h in result.history)  # every batch holds seeds of one prompt
    assert result.metrics["rows"] == 2 * 4 and result.baseline["pairwise_accuracy"] == 0.5
    config = json.loads((out / "config.json").read_text())
    assert (
        config["pipeline_signature"]["text_embed_dim"] == 32
        and config["architecture"] == "transformer"
    )
    card = (out / "README.md").read_text()
    assert "prompt-only baseline" in card and "pairwise accuracy" in card and "rule" in card
    model = load_reward_model(str(out))
    assert isinstance(model, NoiseRewardModel) and model.config.num_inference_steps == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["pairs"] == result.metrics["pairs"]


@pytest.mark.parametrize("accumulate", ["1", "3"])
def test_resume_gives_the_same_next_losses(tiny, tmp_path, accumulate):
    out = tmp_path / "out"
    full = distill.main(args(tiny, out, "--gradient_accumulation_steps", accumulate))
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    resumed = distill.main(
        args(
            tiny,
            out,
            "--gradient_accumulation_steps",
            accumulate,
            "--resume_from_checkpoint",
            "latest",
        )
    )
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]


def test_k_step_x0_inputs(tiny, tmp_path):
    result = distill.main(
        args(tiny, tmp_path / "out", "--input_steps", "1", "--input_kind", "x0", "--max_steps", "2")
    )
    assert len(result.history) == 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["input_steps"], config["input_kind"], config["num_inference_steps"]) == (
        1,
        "x0",
        2,
    )


def untouched(out: Path):
    return sorted((p.relative_to(out).as_posix(), p.stat().st_mtime_ns) for p in out.rglob("*"))


def test_bad_inputs_fail_clearly_and_leave_outputs_alone(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    before = untouched(out)
    with pytest.raises(PipelineError, match="collected with .*sd, a different pipeline"):
        distill.main(args(tiny, out, "--pipeline", str(tiny / "sdxl")))
    with pytest.raises(DataError, match="6 usable prompts, too few for 6 held-out"):
        distill.main(args(tiny, out, "--min_eval_prompts", "6"))
    with pytest.raises(DataError, match="does not exist; run the collect stage"):
        distill.main(args(tiny, out, "--dataset", str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="'input_kind'"):
        distill.main(args(tiny, out, "--input_kind", "x1"))
    assert untouched(out) == before


def test_corrupt_and_foreign_checkpoints(tiny, tmp_path):
    out = tmp_path / "out"
    distill.main(args(tiny, out, "--max_steps", "2"))
    before = untouched(out)
    with pytest.raises(DataError, match="holds checkpoints of an earlier run"):
        distill.main(args(tiny, out))
    other = '{"hidden_dim": 32, "depth": 1, "num_heads": 2}'
    with pytest.raises(DataError, match="from another architecture .*hidden_dim"):
        distill.main(args(tiny, out, "--resume_from_checkpoint", "latest", "--model_kwargs", other))
    assert untouched(out) == before
    ckpt = out / "checkpoints" / "checkpoint-2"
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="checkpoint-2' is corrupt or from another architecture"):
        distill.main(args(tiny, out, "--resume_from_checkpoint", "latest"))
    (ckpt / "trainer_state.json").write_text("{")
    with pytest.raises(DataError, match="is corrupt \\(unreadable trainer_state.json\\)"):
        distill.main(args(tiny, out, "--resume_from_checkpoint", str(ckpt)))
    with pytest.raises(DataError, match="checkpoint '.*nope' does not exist"):
        distill.main(args(tiny, out, "--resume_from_checkpoint", str(tmp_path / "nope")))
    # --overwrite_output_dir starts afresh: the earlier checkpoints go once all checks pass
    distill.main(
        args(tiny, out, "--overwrite_output_dir", "true", "--max_steps", "1", "--save_steps", "1")
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]


def test_unet_lora_variant_by_name(tiny, tmp_path):
    kwargs = '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "lora_rank": 2}'
    result = distill.main(
        args(
            tiny,
            tmp_path / "out",
            "--reward_model",
            "unet_lora",
            "--model_kwargs",
            kwargs,
            "--max_steps",
            "2",
        )
    )
    assert len(result.history) == 2
    model = load_reward_model(str(tmp_path / "out"))
    assert model.config.architecture == "unet_lora" and model.config.unet_config["in_channels"] == 4


@pytest.mark.slow
def test_two_cpu_processes_data_parallel(tiny, tmp_path):
    """Real 2-process DDP (gloo) through accelerate launch; both ranks agree and one folder is
    saved."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(Path(distill.__file__)),
        *args(tiny, out, "--max_steps", "2"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.safetensors").is_file()
    states = sorted(p.name for p in (out / "checkpoints" / "checkpoint-2").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]


@pytest.mark.slow
def test_tiny_recipes_collect_then_distill(tmp_path, monkeypatch):
    """The shipped tiny recipes chained as in CI: toy pipeline, 4 prompts x 2 seeds, 10 steps."""
    from noisealign import collect
    from noisealign.toy import pipeline_path

    if not (pipeline_path() / "model_index.json").is_file():
        pytest.skip("the toy pipeline is not committed yet")
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the recipes' paths are relative to the repository root
    collect.main(["--config", "recipes/tiny/collect.yaml", "--output_dir", str(tmp_path / "c")])
    result = distill.main(
        [
            "--config",
            "recipes/tiny/distill.yaml",
            "--dataset",
            str(tmp_path / "c" / "dataset"),
            "--output_dir",
            str(tmp_path / "d"),
        ]
    )
    assert len(result.history) == 10 and (tmp_path / "d" / "model.safetensors").is_file()


def test_two_runs_with_one_seed_are_identical(tiny, tmp_path):
    first = distill.main(args(tiny, tmp_path / "a", "--max_steps", "2"))
    second = distill.main(args(tiny, tmp_path / "b", "--max_steps", "2"))
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
