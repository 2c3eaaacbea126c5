"""The train_projector stage end to end on a tiny SD pipeline and a tiny random reward model."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from noisealign import train_projector
from noisealign.errors import ConfigError, PipelineError
from noisealign.policies import NoiseProjector, load_projector

PROMPTS = ["a red circle", "a blue square", "a green triangle above a red square", "a red star"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from noisealign.pipelines import pipeline_signature
    from noisealign.rewards import NoiseRewardConfig, NoiseRewardModel
    from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("projector")
    pipe = build_tiny_sd_pipeline(root / "sd")
    build_tiny_sdxl_pipeline(root / "sdxl")
    torch.manual_seed(0)
    sizes = dict(latent_channels=4, text_dim=32, hidden_dim=16, depth=1, num_heads=2)
    config = NoiseRewardConfig(**sizes, mlp_ratio=2.0, pipeline_signature=pipeline_signature(pipe))
    NoiseRewardModel(config).save_pretrained(root / "reward")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def args(root, out, *extra):
    options = {
        "--pipeline": root / "sd",
        "--reward_model": root / "reward",
        "--prompts": root / "prompts.txt",
        "--output_dir": out,
        "--report_to": "none",
        "--max_steps": 4,
        "--save_steps": 2,
        "--logging_steps": 1,
        "--batch_size": 2,
        "--num_candidates": 4,
        "--learning_rate": "1e-3",
        "--projector_kwargs": '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}',
    }
    return [str(x) for option in options.items() for x in option] + list(extra)


def test_trains_logs_and_saves_a_folder_that_records_its_pipeline(tiny, tmp_path):
    out = tmp_path / "out"
    result = train_projector.main(args(tiny, out))
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    first = result.history[0]
    logged = ("rewards/accuracies", "rewards/margins", "reward/projected", "reward/standard")
    logged += ("eps_prime/mean", "eps_prime/std", "eps_prime/ks", "loss/gaussianity")
    for key in logged:
        assert key in first
    assert first["rewards/margins"] == 0.0  # step 1 starts at the identity: Δ = 0
    config = json.loads((out / "config.json").read_text())
    assert config["pipeline_signature"]["text_embed_dim"] == 32
    model = load_projector(str(out))
    assert isinstance(model, NoiseProjector)
    with pytest.raises(PipelineError, match="different pipeline"):
        from noisealign.pipelines import load_pipeline

        load_projector(str(out), load_pipeline(str(tiny / "sdxl")))


@pytest.mark.parametrize("loss_type", ["sigmoid", "reward_gradient"])
def test_every_parameter_changes(tiny, tmp_path, loss_type):
    """Two steps: the zero-initialised head blocks every other gradient in the first one."""
    from noisealign.policies import NoiseProjectorConfig

    torch.manual_seed(0)
    fields = {"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}
    before = NoiseProjector(NoiseProjectorConfig(latent_channels=4, text_dim=32, **fields))
    train_projector.main(args(tiny, tmp_path / "o", "--max_steps", "2", "--loss_type", loss_type))
    after = load_projector(str(tmp_path / "o"))
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters()):
        assert not torch.equal(p0, p1), name


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_other_loss_types_and_all_pairs(tiny, tmp_path, loss_type):
    options = ("--max_steps", "2", "--loss_type", loss_type, "--pair_mode", "all")
    result = train_projector.main(args(tiny, tmp_path / "o", *options))
    assert result.history[0]["pairs"] > 2  # several pairs per sample


def test_rpo_alpha_adds_the_winners_nll_to_the_loss(tiny, tmp_path):
    plain = train_projector.main(args(tiny, tmp_path / "a", "--max_steps", "1"))
    rpo = train_projector.main(args(tiny, tmp_path / "b", "--max_steps", "1", "--rpo_alpha", "3"))
    first, base = rpo.history[0], plain.history[0]
    assert "loss/nll" in first and "loss/nll" not in base
    # same draws at step 1 (identity projector): the loss grows by exactly alpha * NLL
    assert first["loss"] == pytest.approx(base["loss"] + 3 * first["loss/nll"], rel=1e-5)


def test_residual_scale_is_saved_but_training_runs_at_one(tiny, tmp_path):
    plain = train_projector.main(args(tiny, tmp_path / "a", "--max_steps", "2"))
    scaled = train_projector.main(
        args(tiny, tmp_path / "b", "--max_steps", "2", "--residual_scale", "2.5")
    )
    assert [h["loss"] for h in scaled.history] == [h["loss"] for h in plain.history]
    a, b = load_projector(str(tmp_path / "a")), load_projector(str(tmp_path / "b"))
    assert (a.config.residual_scale, b.config.residual_scale) == (1.0, 2.5)
    for p0, p1 in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p0, p1)
    noise, embeds = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    assert not torch.allclose(a(noise, embeds), b(noise, embeds))
    # init_from the scaled folder trains as init_from the plain one: the residual at s = 1
    runs = [
        train_projector.main(
            args(tiny, tmp_path / f"from_{x}", "--max_steps", "1", "--init_from", str(tmp_path / x))
        )
        for x in ("a", "b")
    ]
    assert runs[0].history[0]["loss"] == runs[1].history[0]["loss"]


def test_learning_rate_schedules(tiny, tmp_path):
    constant = train_projector.main(args(tiny, tmp_path / "a"))
    assert [h["lr"] for h in constant.history] == [1e-3] * 4
    options = ("--lr_scheduler_type", "cosine", "--warmup_steps", "1")
    cosine = train_projector.main(args(tiny, tmp_path / "b", *options))
    # transformers' warm-up starts at 0; then half a cosine period over the 3 remaining steps
    assert [h["lr"] for h in cosine.history] == pytest.approx([0, 1e-3, 7.5e-4, 2.5e-4])


def test_resume_gives_the_same_next_losses(tiny, tmp_path):
    out = tmp_path / "out"
    full = train_projector.main(args(tiny, out))
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    resumed = train_projector.main(args(tiny, out, "--resume_from_checkpoint", "latest"))
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]


def test_image_grid_with_judge_scores(tiny, tmp_path):
    out = tmp_path / "out"
    grid = ("--max_steps", "2", "--image_steps", "2", "--image_prompts", "a red circle")
    grid += ("--image_seeds", "0", "1", "--judge", "shapes", "--num_inference_steps", "2")
    train_projector.main(args(tiny, out, *grid))
    grid = out / "images" / "step-000002.png"
    from PIL import Image

    assert Image.open(grid).size == (2 * 32, 2 * 32)  # standard | projected, 2 seeds


def test_grid_judge_is_built_with_the_recipes_judge_kwargs(tiny, tmp_path):
    from noisealign.errors import JudgeError
    from noisealign.testing.vlms import build_tiny_clip

    clip = str(build_tiny_clip(tmp_path / "clip"))
    grid = ("--max_steps", "2", "--image_steps", "2", "--image_prompts", "a red circle")
    grid += ("--judge", "clip", "--num_inference_steps", "2")
    refused = r"judge 'clip' does not accept judge_kwargs \['colour', 'model'\]"
    with pytest.raises(JudgeError, match=refused):
        bad = json.dumps({"model": clip, "colour": "red"})
        train_projector.main(args(tiny, tmp_path / "bad", *grid, "--judge_kwargs", bad))
    good = json.dumps({"model": clip})
    train_projector.main(args(tiny, tmp_path / "out", *grid, "--judge_kwargs", good))
    assert (tmp_path / "out" / "images" / "step-000002.png").exists()


def test_bad_recipes_fail_clearly(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'loss_type'"):
        train_projector.main(args(tiny, tmp_path / "o", "--loss_type", "kto"))
    with pytest.raises(ConfigError, match="'rpo_alpha' must be >= 0"):
        train_projector.main(args(tiny, tmp_path / "o", "--rpo_alpha", "-1"))
    with pytest.raises(ConfigError, match="'image_prompts'"):
        train_projector.main(args(tiny, tmp_path / "o", "--image_steps", "1"))
    with pytest.raises(ConfigError, match="'residual_scale' must be >= 0"):
        train_projector.main(args(tiny, tmp_path / "o", "--residual_scale", "-1"))
    kwargs = '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "residual_scale": 2}'
    with pytest.raises(ConfigError, match="top-level 'residual_scale'"):
        train_projector.main(args(tiny, tmp_path / "o", "--projector_kwargs", kwargs))
    with pytest.raises(PipelineError, match="reward model .* different pipeline"):
        train_projector.main(args(tiny, tmp_path / "o", "--pipeline", str(tiny / "sdxl")))


@pytest.mark.slow
def test_two_processes_match_one_process(tiny, tmp_path):
    """2 gloo processes x batch 2 against 1 process x batch 4: the same global batch, so the
    same mean loss and gradient norm (up to float summation order, 1e-5 relative)."""
    import os
    import subprocess
    import sys

    one = train_projector.main(
        args(tiny, tmp_path / "one", "--batch_size", "4", "--max_steps", "2")
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", str(Path(train_projector.__file__))]
    launch += args(tiny, tmp_path / "two", "--max_steps", "2")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "train_metrics.json").read_text())[-1]
    assert two["loss"] == pytest.approx(one.history[-1]["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one.history[-1]["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_height_and_width_set_the_noise_trained_on_and_the_grid(tiny, tmp_path):
    out = tmp_path / "out"
    grid = ("--max_steps", "2", "--image_steps", "2", "--image_prompts", "a red circle")
    grid += ("--image_seeds", "0", "--num_inference_steps", "2", "--height", "48")
    result = train_projector.main(args(tiny, out, *grid, "--width", "64"))
    from PIL import Image

    assert Image.open(out / "images" / "step-000002.png").size == (2 * 64, 48)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    with pytest.raises(ConfigError, match=r"'height'.*multiple of 8"):
        train_projector.main(args(tiny, tmp_path / "bad", "--height", "50"))
