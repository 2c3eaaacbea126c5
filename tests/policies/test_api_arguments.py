"""The Python API refuses bad arguments with one NoiseAlignError naming the argument and the fix."""

import numpy as np
import pytest
import torch
from torch import nn

from noisealign.errors import ConfigError, NoiseAlignError, PipelineError
from noisealign.noise import batch_noise
from noisealign.pipelines import encode_prompts, generate, latent_shape, pipeline_signature
from noisealign.policies import NoiseProjector, NoiseProjectorConfig, apply_policy, load_policy
from noisealign.rewards.loading import load_reward_model
from noisealign.testing.pipelines import build_tiny_sd_pipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny():
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    config = NoiseProjectorConfig(
        latent_channels=4,
        text_dim=32,
        hidden_dim=16,
        depth=1,
        num_heads=2,
        patch_size=2,
        pipeline_signature=pipeline_signature(pipe),
    )
    return pipe, NoiseProjector(config).eval()


# fmt: off
APPLY_CASES = {
    "bare string": (dict(prompts="a red circle", seeds=[0]), ConfigError, "'prompts' is a single string; pass a list of prompts"),
    "no prompts": (dict(prompts=[], seeds=[]), ConfigError, "'prompts' is empty; pass at least one prompt"),
    "prompt not str": (dict(prompts=["a red circle", 3], seeds=[0, 1]), ConfigError, r"'prompts\[1\]' is a int; pass prompts as strings"),
    "fewer seeds": (dict(prompts=PROMPTS, seeds=[0]), ConfigError, "got 2 prompts but 1 seeds; pass one seed per prompt"),
    "bare int seed": (dict(prompts=PROMPTS[:1], seeds=0), ConfigError, "'seeds' is a int; pass a list of integer seeds"),
    "string seeds": (dict(prompts=PROMPTS[:1], seeds="0"), ConfigError, "'seeds' is a str; pass a list of integer seeds"),
    "float seed": (dict(prompts=PROMPTS[:1], seeds=[0.5]), ConfigError, r"'seeds\[0\]' is 0.5 \(float\); seeds must be integers"),
    "bool seed": (dict(prompts=PROMPTS[:1], seeds=[True]), ConfigError, r"'seeds\[0\]' is True \(bool\)"),
    "prompt ids": (dict(prompts=PROMPTS, seeds=[0, 1], prompt_ids=["p0"]), ConfigError, "got 2 prompts but 1 prompt_ids"),
    "float height": (dict(prompts=PROMPTS[:1], seeds=[0], height=32.0), ConfigError, "'height' is 32.0; pass an integer"),
}
# fmt: on


@pytest.mark.parametrize("case", APPLY_CASES)
def test_apply_policy_refuses_bad_prompts_seeds_and_sizes(tiny, case):
    pipe, policy = tiny
    kwargs, error, message = APPLY_CASES[case]
    with pytest.raises(error, match=message):
        apply_policy(pipe, policy, **kwargs)


# fmt: off
TYPE_CASES = [
    ("runs/tiny_sd", None, PipelineError, "'pipe' is a str, not a diffusers pipeline; load one with noisealign.pipelines.load_pipeline"),
    (None, "outputs/projector", ConfigError, "'policy' is a str, not a noisealign policy .*load one with load_policy"),
    (None, nn.Linear(2, 2), ConfigError, "'policy' is a Linear, not a noisealign policy"),
]
# fmt: on


@pytest.mark.parametrize("pipe, policy, error, message", TYPE_CASES)
def test_apply_policy_refuses_wrong_pipe_and_policy_types(tiny, pipe, policy, error, message):
    pipe, policy = pipe or tiny[0], policy or tiny[1]
    with pytest.raises(error, match=message):
        apply_policy(pipe, policy, PROMPTS, [0, 1])


def test_seeds_of_any_integer_type_give_the_same_noise(tiny):
    pipe, policy = tiny
    expected = apply_policy(pipe, policy, PROMPTS, [0, -3])
    for seeds in ([np.int64(0), np.int32(-3)], (0, -3), torch.tensor([0, -3])):
        assert torch.equal(apply_policy(pipe, policy, tuple(PROMPTS), seeds), expected)


def _latents(pipe, n=2):
    return batch_noise([f"p{i}" for i in range(n)], list(range(n)), latent_shape(pipe))


# fmt: off
PIPELINE_CASES = {
    "encode bare string": (lambda p: encode_prompts(p, "a red circle"), ConfigError, "'prompts' is a single string; pass a list of prompts"),
    "encode no prompts": (lambda p: encode_prompts(p, []), ConfigError, "'prompts' is empty"),
    "encode no pipe": (lambda p: encode_prompts(None, PROMPTS), PipelineError, "'pipe' is a NoneType, not a diffusers pipeline"),
    "latent_shape no pipe": (lambda p: latent_shape("runs/tiny_sd"), PipelineError, "'pipe' is a str"),
    "latent_shape str width": (lambda p: latent_shape(p, 32, "32"), ConfigError, "'width' is '32'; pass an integer number of pixels"),
    "latents not a tensor": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p).tolist(), num_inference_steps=2, guidance_scale=5.0), ConfigError, "'latents' is a list; pass a \\(B, C, h, w\\) torch tensor"),
    "latents int dtype": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p).long(), num_inference_steps=2, guidance_scale=5.0), ConfigError, "'latents' have dtype torch.int64; pass floating-point noise"),
    "latents 3-d": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p)[0], num_inference_steps=2, guidance_scale=5.0), ConfigError, r"latents must be \(B, C, h, w\), got shape \(4, 16, 16\)"),
    "latents channels": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p)[:, :3], num_inference_steps=2, guidance_scale=5.0), ConfigError, "latents have shape .* draw them with latent_shape"),
    "latents count": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p, 1), num_inference_steps=2, guidance_scale=5.0), ConfigError, "got 1 latents for 2 prompt embeddings; pass one per prompt"),
    "latents nan": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p) * float("nan"), num_inference_steps=2, guidance_scale=5.0), ConfigError, "latents contains NaN or Inf"),
    "embeds not encoded": (lambda p: generate(p, PROMPTS, _latents(p), num_inference_steps=2, guidance_scale=5.0), ConfigError, "'embeds' is a list; pass encode_prompts"),
    "zero steps": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p), num_inference_steps=0, guidance_scale=5.0), ConfigError, "'num_inference_steps' is 0; pass an integer >= 1"),
    "nan guidance": (lambda p: generate(p, encode_prompts(p, PROMPTS), _latents(p), num_inference_steps=2, guidance_scale=float("nan")), ConfigError, "'guidance_scale' is nan; pass a finite number"),
    "noise bare id": (lambda p: batch_noise("p0", [0], (4, 8, 8)), ConfigError, "'prompt_ids' is a single string; pass a list of prompt ids"),
    "noise no ids": (lambda p: batch_noise([], [], (4, 8, 8)), ConfigError, "'prompt_ids' is empty"),
    "noise lengths": (lambda p: batch_noise(["p0", "p1"], [0], (4, 8, 8)), ConfigError, "got 2 prompt ids but 1 seeds"),
    "noise float seed": (lambda p: batch_noise(["p0"], [1.0], (4, 8, 8)), ConfigError, r"'seeds\[0\]' is 1.0 \(float\)"),
    "noise shape": (lambda p: batch_noise(["p0"], [0], (4, 0, 8)), ConfigError, r"'shape' is \(4, 0, 8\); pass positive integer sizes"),
    "load_policy path": (lambda p: load_policy(3), ConfigError, "'path_or_id' is 3; pass the policy folder or hub id as a string"),
    "load_policy pipe": (lambda p: load_policy("outputs/projector", "runs/tiny_sd"), PipelineError, "'pipe' is a str"),
    "load_reward_model path": (lambda p: load_reward_model(None), ConfigError, "'path_or_id' is None; pass the reward model folder"),
}
# fmt: on


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_noise_and_loading_helpers_refuse_bad_arguments(tiny, case):
    call, error, message = PIPELINE_CASES[case]
    with pytest.raises(error, match=message) as info:
        call(tiny[0])
    assert isinstance(info.value, NoiseAlignError) and "\n" not in str(info.value)
