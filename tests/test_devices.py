"""Two real processes (gloo on CPU): every rank's judge, pipeline and projector sit on that rank's device.

Each stage logs one line per rank, ``process R on DEVICE: pipeline on D1, judge ...``, read here
from the objects themselves, so a judge or pipeline left on another rank's device shows.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
PROMPTS = ["a red circle", "a blue square left of a yellow triangle", "a green triangle"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from noisealign.pipelines import pipeline_signature
    from noisealign.policies import NoiseProjector, NoiseProjectorConfig
    from noisealign.testing.pipelines import build_tiny_sd_pipeline
    from noisealign.testing.vlms import build_tiny_clip

    root = tmp_path_factory.mktemp("devices")
    pipe = build_tiny_sd_pipeline(root / "sd")
    build_tiny_clip(root / "clip")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    torch.manual_seed(0)
    config = NoiseProjectorConfig(
        latent_channels=4, text_dim=32, hidden_dim=16, depth=1, num_heads=2, patch_size=2,
        pipeline_signature=pipeline_signature(pipe), pipeline=str(root / "sd"),
    )  # fmt: skip
    NoiseProjector(config).save_pretrained(root / "projector")
    return root


def launch(script: str, args: list[str], port: int, processes: int = 2, timeout: int = 600):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port), script, *args,
    ]  # fmt: skip
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def rank_devices(output: str) -> dict[int, list[str]]:
    """Rank -> [accelerator device, the devices its line names], from the stage's per-rank log line."""
    lines = re.findall(r"process (\d+) on (\S+): (.*)", output)
    found = {int(rank): [acc, *re.findall(r"(?:on |device=)([a-z]+(?::\d+)?)", rest)] for rank, acc, rest in lines}  # fmt: skip
    return {rank: [canonical(d) for d in names] for rank, names in found.items()}


def canonical(device: str) -> str:
    """'cpu' for any CPU index (gloo ranks report cpu:0, CPU tensors report cpu); 'cuda:1' as is."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def judge_args(tiny) -> list[str]:
    return ["--judge", "clip", "--judge_kwargs", f'{{"model": "{tiny / "clip"}"}}']


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, extra, port",
    [
        ("collect", ["--batch_size", "2", "--chunk_size", "2"], 29561),
        (
            "collect_npd",
            ["--redenoise_steps", "2", "--batch_size", "2", "--chunk_size", "2"],
            29562,
        ),
    ],
)
def test_each_rank_puts_judge_and_pipeline_on_its_device(tiny, tmp_path, stage, extra, port):
    args = [
        "--pipeline", str(tiny / "sd"), "--prompts", str(tiny / "prompts.txt"), "--seeds", "0:2",
        "--num_inference_steps", "2", "--report_to", "none", "--output_dir", str(tmp_path / "out"),
        *judge_args(tiny), *extra,
    ]  # fmt: skip
    run = launch(f"src/noisealign/{stage}.py", args, port)
    assert run.returncode == 0, run.stderr[-3000:]
    devices = rank_devices(run.stderr)
    assert sorted(devices) == [0, 1], run.stderr[-3000:]
    for rank, (accelerator, pipeline, judge) in devices.items():
        assert accelerator == pipeline == judge, f"rank {rank}: {devices[rank]}"
    assert "CLIPJudge(" in run.stderr  # the line did describe the CLIP judge


@pytest.mark.slow
def test_generate_shards_pairs_over_processes_with_the_single_process_names(tiny, tmp_path):
    from noisealign import generate

    common = ["--projector", str(tiny / "projector"), "--prompt", *PROMPTS[:2], "--seed", "0", "1", "2",
              "--num_inference_steps", "2"]  # fmt: skip
    run = launch("src/noisealign/generate.py", [*common, "--output_dir", str(tmp_path / "two")], 29563)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    devices = rank_devices(run.stderr)
    assert sorted(devices) == [0, 1]
    for rank, (accelerator, pipeline, projector) in devices.items():
        assert accelerator == pipeline == projector, f"rank {rank}: {devices[rank]}"
    # 6 pairs: rank 0 renders 0, 2, 4 and rank 1 renders 1, 3, 5, under the one-process names
    assert "process 0 wrote 3 of 6" in run.stderr and "process 1 wrote 3 of 6" in run.stderr
    one = generate.main([*common, "--output_dir", str(tmp_path / "one")])
    two = sorted((tmp_path / "two").glob("*.png"))
    assert [p.name for p in two] == sorted(p.name for p in one)
    for path in two:  # same noise and prompt: the same picture, up to batch-size rounding
        a = torch.tensor(list(Image.open(path).getdata()), dtype=torch.float32)
        b = torch.tensor(list(Image.open(tmp_path / "one" / path.name).getdata()), dtype=torch.float32)  # fmt: skip
        assert (a - b).abs().max() <= 2, path.name


@pytest.mark.slow
def test_image_npd_refuses_more_than_one_process(tiny, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset", str(tmp_path / "dataset"), "--pipeline", str(tiny / "sd"), "--output_dir", str(out)]  # fmt: skip
    run = launch("src/noisealign/image_npd.py", args, 29564)
    assert run.returncode != 0
    assert "image_npd runs in one process (it writes one dataset), got 2 processes" in run.stderr
    assert "--num_processes 1" in run.stderr
    assert not out.exists()


@pytest.mark.parametrize("stage", ["collect", "collect_npd"])
def test_bad_judge_is_refused_before_the_output_folder_is_claimed(tiny, tmp_path, stage):
    import importlib

    from noisealign.errors import JudgeError

    main = importlib.import_module(f"noisealign.{stage}").main
    out = tmp_path / "out"
    base = ["--pipeline", str(tiny / "sd"), "--prompts", str(tiny / "prompts.txt"), "--report_to", "none", "--output_dir", str(out)]  # fmt: skip
    with pytest.raises(JudgeError, match=r"judge 'clip' does not accept judge_kwargs \['colour', 'model'\]"):  # fmt: skip
        main([*base, "--judge", "clip", "--judge_kwargs", f'{{"model": "{tiny / "clip"}", "colour": "red"}}'])  # fmt: skip
    with pytest.raises(JudgeError, match="unknown judge 'nope'"):
        main([*base, "--judge", "nope"])
    assert not out.exists()  # no recipe.json that would refuse the corrected recipe
