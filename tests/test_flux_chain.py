"""The stages on a tiny random FLUX.1-dev replica, in order: collect -> distill ->
train_projector -> evaluate -> generate, each with the flow-matching Euler sampler where the
recipe names one.

distill trains on the synthetic feedback of :mod:`noisealign.testing.feedback` (a known rule on
the noise): the shapes judge finds nothing on a random model's images, so collect's rows carry
no preference pairs to learn from. What this shows is that every stage runs on FLUX's shapes
(512 T5 tokens of width 96, pooled 32, 16-channel latents packed for the pipeline), not that it
helps. Stages without an image-size field (distill's feedback rows, train_projector, evaluate)
draw the pipeline's default latents, which ``FluxPipeline.__init__`` fixes at 128x128; the
module shrinks that default to the replica's 16x16, as the dry run does
(``noisealign.dry_run.replicas.shrink_default_size``), so the test takes seconds, not a minute.
"""

import functools
import json

import datasets
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from noisealign import collect, distill, evaluate, generate, train_projector
from noisealign.pipelines import load_pipeline, pipeline_signature
from noisealign.policies import load_projector
from noisealign.rewards import load_reward_model
from noisealign.testing.feedback import FEEDBACK_PROMPTS, build_feedback_dataset
from noisealign.testing.flow_pipelines import build_tiny_flux_pipeline
from noisealign.testing.pipelines import LATENT_SIZE

PROMPTS = ["a red circle", "a blue square left of a yellow triangle"]
FLOW = ["--scheduler", "flow_euler", "--num_inference_steps", "2", "--report_to", "none"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_chain")
    build_tiny_flux_pipeline(root / "flux")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    init = FluxPipeline.__init__

    @functools.wraps(init)  # diffusers reads the components from __init__'s signature
    def small_default(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.default_sample_size = LATENT_SIZE

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FluxPipeline, "__init__", small_default)
        yield root


@pytest.fixture(scope="module")
def signature(root):
    return pipeline_signature(load_pipeline(str(root / "flux")))


@pytest.mark.slow
def test_collect_rows_carry_the_t5_tokens(root):
    args = ["--pipeline", str(root / "flux"), "--judge", "shapes", "--prompts"]
    args += [str(root / "prompts.txt"), "--seeds", "0:2", "--batch_size", "4", *FLOW]
    args += ["--height", "32", "--width", "32"]
    collect.main([*args, "--save_noise", "true", "--output_dir", str(root / "collect")])
    rows = datasets.load_from_disk(str(root / "collect" / "dataset"))
    assert rows.num_rows == 4
    first = next(r for r in rows if r["prompt"] == "a red circle")
    assert len(first["tokens"]) == 512 and first["tokens"][:3] == ["▁a", "▁red", "▁circle"]
    assert sum(first["token_mask"]) == 3  # each word once: the T5 tokens alone
    assert torch.tensor(first["noise"]).shape == (16, 16, 16)


@pytest.mark.slow
def test_distill_train_projector_evaluate_generate(root, signature, tmp_path):
    pipe = load_pipeline(str(root / "flux"))
    feedback = root / "feedback"
    build_feedback_dataset(
        pipe, feedback, list(FEEDBACK_PROMPTS), range(4), pipeline=str(root / "flux")
    )
    distill.main(
        ["--dataset", str(feedback), "--pipeline", str(root / "flux"), "--report_to"]
        + ["none", "--max_steps", "2", "--prompts_per_batch", "2", "--eval_fraction", "0.34"]
        + ["--model_kwargs", '{"hidden_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0}']
        + ["--output_dir", str(root / "reward")]
    )
    assert load_reward_model(str(root / "reward")).config.pipeline_signature == signature

    train_projector.main(
        ["--pipeline", str(root / "flux"), "--reward_model", str(root / "reward"), "--prompts"]
        + [str(root / "prompts.txt"), "--report_to", "none", "--max_steps", "2", "--batch_size"]
        + ["2", "--num_candidates", "4", "--learning_rate", "1e-3", "--projector_kwargs"]
        + ['{"hidden_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 2}', "--output_dir"]
        + [str(root / "projector")]
    )
    projector = load_projector(str(root / "projector"), pipe)
    config = projector.config
    assert (config.latent_channels, config.text_dim, config.pooled_dim) == (16, 96, 32)
    assert projector.head.weight.abs().amax() > 0  # trained away from the zero-initialised head

    methods = {"standard": {"type": "standard"}}
    methods["projector"] = {"type": "policy", "policy": str(root / "projector")}
    methods["best_of_2"] = {"type": "best_of_n", "n": 2}
    report = evaluate.main(
        ["--pipeline", str(root / "flux"), "--prompt_sets"]
        + [json.dumps({"mini": str(root / "prompts.txt")}), "--seeds", "0:2", "--judges"]
        + ["shapes", "--methods", json.dumps(methods), "--batch_size", "4", "--num_threads"]
        + ["1", *FLOW, "--output_dir", str(tmp_path / "evaluate")]
    )
    rows = report["prompt_sets"]["mini"]["methods"]
    assert [(m["name"], m["images"]) for m in rows] == [
        ("standard", 4),
        ("projector", 4),
        ("best_of_2", 4),
    ]

    paths = generate.main(
        ["--projector", str(root / "projector"), "--prompt", PROMPTS[0], "--seed", "0", "1"]
        + [*FLOW[:4], "--height", "32", "--width", "32", "--output_dir", str(tmp_path / "png")]
    )
    assert [p.name for p in paths] == ["000_seed0.png", "000_seed1.png"]
    assert Image.open(paths[0]).size == (32, 32)
