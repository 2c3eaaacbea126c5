"""train_npnet on hand-made noise pairs for a tiny SD pipeline: learning, per-sample prompts,
resume, bad inputs."""

import json
import logging
import shutil
from pathlib import Path

import datasets
import pytest
import torch

from noisealign import train_npnet
from noisealign.data.npd import load_noise_pairs, npd_features
from noisealign.errors import ConfigError, DataError, PipelineError
from noisealign.noise import initial_noise
from noisealign.pipelines import encode_prompts, pipeline_signature
from noisealign.policies import NPNet, load_policy, pair_training

PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a red square",
    "a blue circle",
]
SHAPE = (4, 16, 16)


def pattern(prompt_index: int, shape=SHAPE) -> torch.Tensor:
    """A fixed unit-variance direction per prompt: the 'semantics' re-denoising would inject."""
    return initial_noise(f"direction-{prompt_index}", 0, shape)


def write_pairs(path, signature, *, seeds=4, shape=SHAPE, nan_row=None, drop=(), kept=None):
    """An NPD whose target is 0.8·x_T + 0.6·direction(prompt): learnable from (x_T, prompt)."""
    rows = []
    for p, prompt in enumerate(PROMPTS):
        for seed in range(seeds):
            source = initial_noise(f"p{p}", seed, shape)
            target = 0.8 * source + 0.6 * pattern(p, shape)
            if nan_row == len(rows):
                target[0, 0, 0] = float("nan")
            rows.append(
                {
                    "prompt_id": f"p{p}",
                    "prompt": prompt,
                    "seed": seed,
                    "source_noise": source.numpy(),
                    "target_noise": target.numpy(),
                    "source_score": 0.2,
                    "target_score": 0.8,
                    "kept": True if kept is None else kept(len(rows)),
                    "failed": False,
                    "error": "",
                    "judge": "hand",
                    "margin": 0.0,
                    "pipeline": "tiny",
                    "latent_shape": list(shape),
                    "pipeline_signature": json.dumps(signature),
                    "height": 32,
                    "width": 32,
                    "num_inference_steps": 2,
                    "guidance_scale": 5.0,
                    "redenoise_steps": 4,
                    "guidance_denoise": 5.5,
                    "guidance_invert": 1.0,
                }
            )
    dataset = datasets.Dataset.from_list(rows, features=npd_features(shape))
    dataset.remove_columns(list(drop)).save_to_disk(str(path / "dataset"))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("npnet")
    pipe = build_tiny_sd_pipeline(root / "sd")
    sdxl = build_tiny_sdxl_pipeline(root / "sdxl")
    write_pairs(root / "pairs", pipeline_signature(pipe))
    return {
        "root": root,
        "pipe": pipe,
        "signature": pipeline_signature(pipe),
        "sdxl_signature": pipeline_signature(sdxl),
    }


def args(tiny, out, *extra, dataset=None):
    return [
        "--pipeline",
        str(tiny["root"] / "sd"),
        "--dataset",
        str(dataset or tiny["root"] / "pairs"),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--batch_size",
        "4",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--learning_rate",
        "3e-3",
        "--eval_fraction",
        "0.34",
        "--policy_kwargs",
        '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4}',
        *extra,
    ]


def test_loss_decreases_and_the_folder_records_its_pipeline(tiny, tmp_path):
    out = tmp_path / "out"
    result = train_npnet.main(args(tiny, out, "--max_steps", "40"))
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5  # measured: 0.39 -> 0.32 in 40 steps
    assert result.history[0]["relative_mse"] == pytest.approx(
        1.0, abs=1e-6
    )  # starts as the identity
    for key in (
        "mse",
        "identity_mse",
        "relative_mse",
        "eps_prime/mean",
        "eps_prime/std",
        "eps_prime/ks",
    ):
        assert key in result.metrics
    assert result.history[-1]["relative_mse"] < 0.9  # better than returning x_T on seen prompts
    config = json.loads((out / "config.json").read_text())
    assert config["policy_type"] == "npnet" and config["pipeline_signature"] == tiny["signature"]
    summary = json.loads((out / "train_metrics.json").read_text())
    assert not set(summary["train_prompts"]) & set(summary["eval_prompts"])  # split by prompt
    assert summary["train_pairs"] + summary["eval_pairs"] == len(PROMPTS) * 4
    policy = load_policy(str(out), tiny["pipe"])
    assert isinstance(policy, NPNet) and not policy.training


def test_every_parameter_changes(tiny, tmp_path):
    train_npnet.main(args(tiny, tmp_path / "o", "--max_steps", "3"))
    before = train_npnet.build_policy(
        train_npnet.parse_config(train_npnet.TrainNPNetConfig, args(tiny, tmp_path / "o2")),
        tiny["signature"],
        SHAPE,
    )
    after = load_policy(str(tmp_path / "o"))
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters()):
        assert not torch.equal(p0, p1), name


def test_noise_projector_is_regressed_onto_the_pairs(tiny, tmp_path):
    """policy_type noise_projector: starts as the identity, learns, and loads as
    train_projector's init_from."""
    from noisealign.policies import NoiseProjector

    out = tmp_path / "proj"
    result = train_npnet.main(
        args(tiny, out, "--max_steps", "40", "--policy_type", "noise_projector")
    )
    assert result.history[0]["relative_mse"] == pytest.approx(1.0, abs=1e-6)  # zero head: identity
    assert result.history[-1]["relative_mse"] < 0.9
    policy = load_policy(str(out), tiny["pipe"])
    assert isinstance(policy, NoiseProjector)
    assert policy.config.pipeline_signature == tiny["signature"]
    assert policy.config.hidden_dim == 16  # policy_kwargs sized it


def test_each_sample_is_conditioned_on_its_own_prompt(tiny):
    pairs = load_noise_pairs(tiny["root"] / "pairs")
    seen = {}

    def model(noise, embeds, mask, pooled):
        seen["embeds"] = embeds
        return noise

    rows = torch.tensor([0, 5, 9, 23])  # four different prompts
    batch = {"source": torch.zeros(4, *SHAPE), "target": torch.zeros(4, *SHAPE), "row": rows}
    pair_training.batch_loss(model, tiny["pipe"], pairs, batch)
    expected = encode_prompts(tiny["pipe"], [pairs.prompts[r] for r in rows.tolist()]).embeds
    assert torch.equal(seen["embeds"], expected)
    assert not torch.equal(seen["embeds"][0], seen["embeds"][1])


def test_resume_gives_the_same_next_losses(tiny, tmp_path):
    out = tmp_path / "out"
    full = train_npnet.main(args(tiny, out))
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    resumed = train_npnet.main(args(tiny, out, "--resume_from_checkpoint", "latest"))
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[2:]]
    with pytest.raises(DataError, match="holds checkpoints of an earlier run"):
        train_npnet.main(args(tiny, out))


def test_gradient_accumulation_matches_a_bigger_batch(tiny, tmp_path):
    big = train_npnet.main(args(tiny, tmp_path / "big", "--batch_size", "8", "--max_steps", "1"))
    small = train_npnet.main(
        args(
            tiny,
            tmp_path / "acc",
            "--batch_size",
            "4",
            "--gradient_accumulation_steps",
            "2",
            "--max_steps",
            "1",
        )
    )
    assert small.history[0]["grad_norm"] == pytest.approx(big.history[0]["grad_norm"], rel=1e-5)


def test_missing_columns_nan_rows_and_margin(tiny, tmp_path, caplog):
    missing = write_pairs(tmp_path / "missing", tiny["signature"], drop=("target_noise", "kept"))
    with pytest.raises(DataError, match="lacks the columns target_noise, kept"):
        train_npnet.main(args(tiny, tmp_path / "o", dataset=missing))
    with pytest.raises(DataError, match="does not exist"):
        train_npnet.main(args(tiny, tmp_path / "o", dataset=tmp_path / "nowhere"))
    caplog.set_level(logging.INFO)
    nan = write_pairs(tmp_path / "nan", tiny["signature"], nan_row=3)
    result = train_npnet.main(args(tiny, tmp_path / "o", "--max_steps", "1", dataset=nan))
    assert "skipped 1 pairs with NaN/Inf noise: rows [3]" in caplog.text
    assert "23 kept pairs" in caplog.text
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # half the pairs not kept; a margin re-filters them all from the scores instead
    half = write_pairs(tmp_path / "half", tiny["signature"], kept=lambda i: i % 2 == 0)
    assert load_noise_pairs(half).num_rows == 12
    assert load_noise_pairs(half, margin=0.5).num_rows == 24  # 0.2 + 0.5 < 0.8
    with pytest.raises(DataError, match="no usable pair"):
        load_noise_pairs(half, margin=0.7)


def test_pairs_of_another_pipeline_are_refused(tiny, tmp_path):
    sdxl = write_pairs(tmp_path / "sdxl", tiny["sdxl_signature"])
    with pytest.raises(PipelineError, match="different pipeline"):
        train_npnet.main(args(tiny, tmp_path / "o", dataset=sdxl))
    three = write_pairs(tmp_path / "three", tiny["signature"], shape=(3, 16, 16))
    with pytest.raises(PipelineError, match="3 latent channels but the pipeline's latents have 4"):
        train_npnet.main(args(tiny, tmp_path / "o", dataset=three))
    wide = write_pairs(tmp_path / "wide", tiny["signature"], shape=(4, 16, 24))
    with pytest.raises(PipelineError, match="square 4-channel latents"):
        train_npnet.main(
            args(
                tiny,
                tmp_path / "o",
                "--policy_type",
                "npnet_compat",
                "--policy_kwargs",
                "{}",
                dataset=wide,
            )
        )
    # the improved NPNet takes any latent size
    result = train_npnet.main(args(tiny, tmp_path / "o", "--max_steps", "1", dataset=wide))
    assert result.history[0]["step"] == 1


def test_bad_recipes_fail_clearly(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'policy_type' must be one of"):
        train_npnet.main(args(tiny, tmp_path / "o", "--policy_type", "unet"))
    with pytest.raises(ConfigError, match="'policy_kwargs' does not fit NPNetConfig"):
        train_npnet.main(args(tiny, tmp_path / "o", "--policy_kwargs", '{"widht": 3}'))
    with pytest.raises(ConfigError, match="'eval_fraction' must be in"):
        train_npnet.main(args(tiny, tmp_path / "o", "--eval_fraction", "1.0"))


def test_compat_architecture_trains_on_square_latents(tiny, tmp_path):
    kwargs = '{"swin_embed_dim": 8, "swin_depths": [1, 1, 1, 1], "swin_heads": [1, 1, 2, 2]}'
    result = train_npnet.main(
        args(
            tiny,
            tmp_path / "o",
            "--policy_type",
            "npnet_compat",
            "--policy_kwargs",
            kwargs,
            "--max_steps",
            "2",
        )
    )
    assert [h["step"] for h in result.history] == [1, 2]
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["policy_type"] == "npnet_compat" and config["resolution"] == 16
    assert (
        load_policy(str(tmp_path / "o"), tiny["pipe"]).config.text_length
        == tiny["signature"]["text_length"]
    )


@pytest.mark.slow
def test_two_processes_match_one_process(tiny, tmp_path):
    """2 gloo processes x batch 2 against 1 process x batch 4: the same pairs per step, so the
    same mean loss and gradient norm (up to float summation order)."""
    import os
    import subprocess
    import sys

    one = train_npnet.main(args(tiny, tmp_path / "one", "--batch_size", "4", "--max_steps", "2"))
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
        "--main_process_port",
        "29531",
        str(Path(train_npnet.__file__)),
        *args(tiny, tmp_path / "two", "--batch_size", "2", "--max_steps", "2"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "train_metrics.json").read_text())["history"]
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    assert two[-1]["grad_norm"] == pytest.approx(one.history[-1]["grad_norm"], rel=1e-5)


def test_sdxl_recipes_code_paths_with_tiny_models(tiny, tmp_path, monkeypatch):
    """recipes/sdxl/{collect_npd,train_npnet}.yaml on a tiny SDXL: pooled embeddings and time ids
    in re-denoise sampling, pooled FiLM in NPNet; only sizes, judge and paths overridden."""
    from noisealign import collect_npd, judges
    from noisealign.pipelines import load_pipeline
    from noisealign.policies import apply_policy

    class Coin:
        name = "coin"

        def score(self, images, prompts, concepts=None):
            return [judges.Feedback(overall=(sum(im.tobytes()) % 97) / 96) for im in images]

    monkeypatch.setitem(judges.JUDGES, "coin", Coin)
    root = tiny["root"]
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "sdxl"
    collect_npd.main(
        [
            "--config",
            str(recipes / "collect_npd.yaml"),
            "--pipeline",
            str(root / "sdxl"),
            "--torch_dtype",
            "float32",
            "--judge",
            "coin",
            "--judge_kwargs",
            "{}",
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--seeds",
            "0:2",
            "--num_inference_steps",
            "2",
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path / "pairs"),
        ]
    )
    result = train_npnet.main(
        [
            "--config",
            str(recipes / "train_npnet.yaml"),
            "--pipeline",
            str(root / "sdxl"),
            "--torch_dtype",
            "float32",
            "--dataset",
            str(tmp_path / "pairs"),
            "--margin",
            "-1.0",
            "--policy_kwargs",
            '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4}',
            "--eval_fraction",
            "0.34",
            "--batch_size",
            "4",
            "--max_steps",
            "2",
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    assert [h["step"] for h in result.history] == [1, 2]
    sdxl = load_pipeline(str(root / "sdxl"))
    policy = load_policy(str(tmp_path / "out"), sdxl)
    assert policy.config.pooled_dim == tiny["sdxl_signature"]["pooled_dim"]
    latents = apply_policy(sdxl, policy, PROMPTS[:2], seeds=[0, 1])
    assert latents.shape == (2, *SHAPE) and torch.isfinite(latents).all()
