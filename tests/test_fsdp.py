"""FSDP (accelerate's FSDP2) on 2 CPU processes with gloo: saved folders hold the full weights,
and a resume from a sharded checkpoint ends where the uninterrupted run does.

accelerate 1.15 runs FSDP only on accelerator devices: under ``ACCELERATE_USE_CPU=1`` an FSDP
config silently becomes plain CPU data-parallel. Launched as a script, this file switches
accelerate's FSDP back on for CPU (:func:`enable_cpu_fsdp`, only that device check is patched)
and runs a stage, so the stage's FSDP code (``fully_shard``, sharded ``save_state`` /
``load_state``, ``get_state_dict``) runs here with torch's gloo backend:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml \
      --num_processes 2 --mixed_precision no tests/test_fsdp.py distill --config ...
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def enable_cpu_fsdp() -> None:
    """Make accelerate keep FSDP on CPU processes (it turns an FSDP plugin into MULTI_CPU)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # PartialState too: each AcceleratorState() call copies its distributed_type
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    state.AcceleratorState.__init__ = patched


def launch_fsdp(stage: str, args: list[str], port: int) -> str:
    """Run ``stage`` on 2 FSDP CPU processes with the shipped fsdp.yaml; returns the output."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes/accelerate_configs/fsdp.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port),
        __file__,
        stage,
        *args,
    ]
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def merged_checkpoint(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded FSDP checkpoint, merged on one process by accelerate."""
    from accelerate.utils import merge_fsdp_weights

    merge_fsdp_weights(str(checkpoint / "pytorch_model_fsdp_0"), str(tmp), safe_serialization=True)
    return folder_weights(tmp)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from noisealign.testing.feedback import FEEDBACK_PROMPTS, build_feedback_dataset
    from noisealign.testing.pipelines import build_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("fsdp")
    pipe = build_tiny_sd_pipeline(root / "sd")
    build_feedback_dataset(
        pipe, root / "data", list(FEEDBACK_PROMPTS), range(4), pipeline=str(root / "sd")
    )
    return root


def distill_args(root: Path, out: Path, *extra: str) -> list[str]:
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
        "0",
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
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "architecture, kwargs, port",
    [
        ("transformer", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}', 29571),
        # shard groups of frozen UNet weights mixed with trainable LoRA adapters
        ("unet_lora", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "lora_rank": 2}', 29575),
    ],
    ids=["transformer", "unet_lora"],
)
def test_distill_under_fsdp_saves_full_weights_and_resumes_exactly(
    tiny, tmp_path, architecture, kwargs, port
):
    from noisealign.rewards import load_reward_model

    out = tmp_path / "out"
    model_args = ("--reward_model", architecture, "--model_kwargs", kwargs)
    launch_fsdp("distill", distill_args(tiny, out, *model_args), port)
    # really FSDP on two ranks: the checkpoint is sharded, one file per rank
    assert sorted(
        p.name for p in (out / "checkpoints/checkpoint-4/pytorch_model_fsdp_0").glob("*.distcp")
    ) == ["__0_0.distcp", "__1_0.distcp"]
    trained = merged_checkpoint(out / "checkpoints/checkpoint-4", tmp_path / "merged")
    saved = folder_weights(out)
    assert_same(saved, trained)  # the gathered weights, not one rank's shard
    model = load_reward_model(str(out))  # one process, plain from_pretrained
    assert_same(model.state_dict(), trained)
    assert json.loads((out / "metrics.json").read_text())["info"]["parameters"] == sum(
        v.numel() for v in trained.values()
    )

    # resume from the sharded checkpoint of step 2: the same final weights as the run above
    shutil.rmtree(out / "checkpoints/checkpoint-4")
    (out / "model.safetensors").unlink()
    resume = ("--resume_from_checkpoint", "latest")
    launch_fsdp("distill", distill_args(tiny, out, *model_args, *resume), port + 1)
    assert_same(folder_weights(out), trained)


@pytest.fixture(scope="module")
def reward(tiny):
    """A tiny random reward model for the projector's stage, and a prompt file."""
    from noisealign.pipelines import load_pipeline, pipeline_signature
    from noisealign.rewards import NoiseRewardConfig, NoiseRewardModel
    from noisealign.testing.feedback import FEEDBACK_PROMPTS

    torch.manual_seed(0)
    config = NoiseRewardConfig(
        latent_channels=4,
        text_dim=32,
        hidden_dim=16,
        depth=1,
        num_heads=2,
        mlp_ratio=2.0,
        pipeline_signature=pipeline_signature(load_pipeline(str(tiny / "sd"))),
    )
    NoiseRewardModel(config).save_pretrained(tiny / "reward")
    (tiny / "prompts.txt").write_text("\n".join(FEEDBACK_PROMPTS[:4]) + "\n")
    return tiny


def projector_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pipeline",
        str(root / "sd"),
        "--reward_model",
        str(root / "reward"),
        "--prompts",
        str(root / "prompts.txt"),
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--batch_size",
        "2",
        "--num_candidates",
        "4",
        "--learning_rate",
        "1e-3",
        "--projector_kwargs",
        '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}',
        *extra,
    ]


@pytest.mark.slow
def test_train_projector_under_fsdp_saves_full_weights_and_resumes_exactly(reward, tmp_path):
    from noisealign.policies import load_projector

    out = tmp_path / "out"
    launch_fsdp("train_projector", projector_args(reward, out), 29573)
    checkpoint = out / "checkpoints/checkpoint-4"
    assert len(list((checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    trained = merged_checkpoint(checkpoint, tmp_path / "merged")
    assert_same(folder_weights(out), trained)
    assert_same(load_projector(str(out)).state_dict(), trained)

    shutil.rmtree(checkpoint)
    (out / "model.safetensors").unlink()
    launch_fsdp(
        "train_projector", projector_args(reward, out, "--resume_from_checkpoint", "latest"), 29574
    )
    assert_same(folder_weights(out), trained)


if __name__ == "__main__":
    enable_cpu_fsdp()
    from noisealign.cli import main

    main(sys.argv[1:])
