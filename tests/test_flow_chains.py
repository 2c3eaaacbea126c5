"""The stages on tiny random SD3 and FLUX.1-dev replicas, in order: collect -> collect_npd ->
distill -> train_projector -> evaluate (the searches with their own steps included) -> generate,
each with the flow-matching Euler sampler where the recipe names one.

distill trains on the synthetic feedback of :mod:`noisealign.testing.feedback` (a known rule on
the noise): the shapes judge finds nothing on a random model's images, so collect's rows carry
no preference pairs to learn from. What this shows is that every stage runs on each family's
shapes (SD3: the 333-token joint CLIP/T5 sequence of width 96, pooled 64; FLUX: 512 T5 tokens
of width 96, pooled 32, latents packed for the pipeline; both 16-channel latents), not that it
helps. Stages given no image size (distill's feedback rows, train_projector, evaluate)
draw the pipeline's default latents, which ``FluxPipeline.__init__`` fixes at 128x128; the
FLUX runs shrink that default to the replica's 16x16, as the dry run does
(``noisealign.dry_run.replicas.shrink_default_size``), so the test takes seconds.
"""

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from noisealign import collect, collect_npd, distill, evaluate, generate, train_projector
from noisealign.errors import ConfigError
from noisealign.pipelines import load_pipeline, pipeline_signature
from noisealign.policies import load_projector
from noisealign.rewards import load_reward_model
from noisealign.testing.feedback import FEEDBACK_PROMPTS, build_feedback_dataset
from noisealign.testing.flow_pipelines import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from noisealign.testing.pipelines import LATENT_SIZE

pytestmark = pytest.mark.slow
PROMPTS = ["a red circle", "a blue square left of a yellow triangle"]
FLOW = ["--scheduler", "flow_euler", "--num_inference_steps", "2", "--report_to", "none"]
SIZE = ["--height", "32", "--width", "32"]


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable
    tokens: int  # positions of a collect row's token list
    first_word: int  # where "a red circle"'s T5 tokens start in it
    masked: int  # token_mask's count for "a red circle"
    pooled_dim: int


FAMILIES = [
    # each word once in the CLIP part, once in the T5 part
    Family("sd3", build_tiny_sd3_pipeline, 333, 77, 6, 64),
    # each word once: the T5 tokens alone
    Family("flux", build_tiny_flux_pipeline, 512, 0, 3, 32),
]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def root(tmp_path_factory, family):
    root = tmp_path_factory.mktemp(f"{family.name}_chain")
    family.build(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    init = FluxPipeline.__init__

    @functools.wraps(init)  # diffusers reads the components from __init__'s signature
    def small_default(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.default_sample_size = LATENT_SIZE

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxPipeline, "__init__", small_default)
        yield root


def test_collect_rows_carry_the_text_tokens(root, family):
    args = ["--pipeline", str(root / "pipe"), "--judge", "shapes", "--prompts"]
    args += [str(root / "prompts.txt"), "--seeds", "0:2", "--batch_size", "4", *FLOW, *SIZE]
    collect.main([*args, "--save_noise", "true", "--output_dir", str(root / "collect")])
    rows = datasets.load_from_disk(str(root / "collect" / "dataset"))
    assert rows.num_rows == 4
    first = next(r for r in rows if r["prompt"] == "a red circle")
    start = family.first_word
    assert len(first["tokens"]) == family.tokens
    assert first["tokens"][start : start + 3] == ["▁a", "▁red", "▁circle"]
    assert sum(first["token_mask"]) == family.masked
    assert torch.tensor(first["noise"]).shape == (16, 16, 16)


def test_collect_npd_re_denoises_with_flow_matching_steps(root, family):
    args = ["--pipeline", str(root / "pipe"), "--judge", "shapes", "--prompts"]
    args += [str(root / "prompts.txt"), "--seeds", "0:2", "--redenoise_steps", "4"]
    args += ["--guidance_denoise", "4.0", *FLOW, *SIZE, "--output_dir", str(root / "npd")]
    rows = collect_npd.main(args).with_format("torch")
    assert rows.num_rows == 4
    source, target = rows[0]["source_noise"], rows[0]["target_noise"]
    assert source.shape == target.shape == (16, 16, 16)
    assert (target - source).abs().mean() > 1e-4  # one Euler step and its inverse moved it


def test_distill_train_projector_evaluate_generate(root, family, tmp_path):
    pipe = load_pipeline(str(root / "pipe"))
    signature = pipeline_signature(pipe)
    feedback = root / "feedback"
    build_feedback_dataset(
        pipe, feedback, list(FEEDBACK_PROMPTS), range(4), pipeline=str(root / "pipe")
    )
    distill.main(
        ["--dataset", str(feedback), "--pipeline", str(root / "pipe"), "--report_to"]
        + ["none", "--max_steps", "2", "--prompts_per_batch", "2", "--eval_fraction", "0.34"]
        + ["--model_kwargs", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}']
        + ["--output_dir", str(root / "reward")]
    )
    assert load_reward_model(str(root / "reward")).config.pipeline_signature == signature
    unet = ["--dataset", str(feedback), "--pipeline", str(root / "pipe"), "--reward_model"]
    with pytest.raises(ConfigError) as exc:  # refused before anything is written
        distill.main([*unet, "unet_lora", "--output_dir", str(tmp_path / "unet_lora")])
    assert str(exc.value) == (
        f"reward_model 'unet_lora' fine-tunes the pipeline's UNet, and {type(pipe).__name__} has "
        "a transformer instead; use reward_model: transformer"
    )
    assert not (tmp_path / "unet_lora").exists()

    train_projector.main(
        ["--pipeline", str(root / "pipe"), "--reward_model", str(root / "reward"), "--prompts"]
        + [str(root / "prompts.txt"), "--report_to", "none", "--max_steps", "2", "--batch_size"]
        + ["2", "--num_candidates", "4", "--learning_rate", "1e-3", "--projector_kwargs"]
        + ['{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}', "--output_dir"]
        + [str(root / "projector")]
    )
    projector = load_projector(str(root / "projector"), pipe)
    config = projector.config
    assert (config.latent_channels, config.text_dim, config.pooled_dim) == (
        16,
        96,
        family.pooled_dim,
    )
    assert projector.head.weight.abs().amax() > 0  # trained away from the zero-initialised head

    methods = {"standard": {"type": "standard"}}
    methods["projector"] = {"type": "policy", "policy": str(root / "projector")}
    methods["best_of_2"] = {"type": "best_of_n", "n": 2}
    methods["early_stop_2"] = {"type": "early_stop", "n": 2, "stop_step": 1}
    methods["noise_diffusion"] = {"type": "noise_diffusion", "rounds": 1, "num_candidates": 2}
    report = evaluate.main(
        ["--pipeline", str(root / "pipe"), "--prompt_sets"]
        + [json.dumps({"mini": str(root / "prompts.txt")}), "--seeds", "0:2", "--judges"]
        + ["shapes", "--methods", json.dumps(methods), "--batch_size", "4", "--num_threads"]
        + ["1", *FLOW, "--output_dir", str(tmp_path / "evaluate")]
    )
    rows = report["prompt_sets"]["mini"]["methods"]
    names = [(m["name"], m["images"]) for m in rows]
    assert names == [
        ("standard", 4),
        ("projector", 4),
        ("best_of_2", 4),
        ("early_stop_2", 4),
        ("noise_diffusion", 4),
    ]
    steps = {m["name"]: m["denoising_steps"] for m in rows}
    assert steps["early_stop_2"] == 2 * 1 + 2 - 1 and steps["noise_diffusion"] == 2 + 2

    paths = generate.main(
        ["--projector", str(root / "projector"), "--prompt", PROMPTS[0], "--seed", "0", "1"]
        + [*FLOW[:4], *SIZE, "--output_dir", str(tmp_path / "png")]
    )
    assert [p.name for p in paths] == ["000_seed0.png", "000_seed1.png"]
    assert Image.open(paths[0]).size == (32, 32)
