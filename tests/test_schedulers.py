"""The recipe's sampler (``scheduler`` / ``scheduler_kwargs``): each name builds its class on a
tiny pipeline, DDIM stays today's output, other samplers change the image, and every bad input
is one line."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from noisealign import evaluate
from noisealign.cli import main as cli_main
from noisealign.collect import CollectConfig
from noisealign.configs import parse_config
from noisealign.errors import ConfigError, DataError, PipelineError
from noisealign.evaluate import EvaluateConfig
from noisealign.generate import GenerateConfig
from noisealign.noise import batch_noise
from noisealign.pipelines import denoise_step, encode_prompts, generate, latent_shape, load_pipeline
from noisealign.pipelines.adapters import adapter_for
from noisealign.pipelines.schedulers import SCHEDULERS, set_scheduler
from noisealign.pipelines.steps import conditioning
from noisealign.testing.pipelines import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from noisealign.toy import pipeline_path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square"]
STEPS = dict(num_inference_steps=4, guidance_scale=5.0)
CLASSES = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
}
NAMES = "'ddim', 'euler', 'dpmsolver++', 'lcm', 'flow_euler'"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``sd`` (DDIM, epsilon), ``sdxl`` and ``flow`` (the tiny SD model saved with a
    flow-matching scheduler), plus a prompt file."""
    root = tmp_path_factory.mktemp("schedulers")
    build_tiny_sd_pipeline(root / "sd")
    build_tiny_sdxl_pipeline(root / "sdxl")
    flow = build_tiny_sd_pipeline()
    flow.scheduler = FlowMatchEulerDiscreteScheduler()
    flow.save_pretrained(root / "flow")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def images(pipe, latents):
    return generate(pipe, encode_prompts(pipe, PROMPTS), latents, output_type="pt", **STEPS)


def noise(pipe):
    return batch_noise(["p0", "p1"], [0, 1], latent_shape(pipe))


def test_the_table_holds_the_five_samplers():
    assert {name: s.cls for name, s in SCHEDULERS.items()} == CLASSES
    assert SCHEDULERS["dpmsolver++"].defaults == {"algorithm_type": "dpmsolver++"}
    assert [n for n, s in SCHEDULERS.items() if s.flow_matching] == ["flow_euler"]


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmsolver++", "lcm"])
def test_each_ddpm_sampler_builds_its_class_from_the_pipeline_config(folders, name):
    pipe = load_pipeline(str(folders / "sd"), scheduler=name)
    assert type(pipe.scheduler) is CLASSES[name]
    saved = json.loads((folders / "sd" / "scheduler" / "scheduler_config.json").read_text())
    for key in ("beta_schedule", "beta_start", "beta_end", "prediction_type", "timestep_spacing"):
        assert pipe.scheduler.config[key] == saved[key], key
    if name == "dpmsolver++":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"


def test_flow_euler_builds_on_a_flow_matching_model(folders):
    pipe = load_pipeline(str(folders / "flow"), scheduler="flow_euler")
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler


def test_scheduler_kwargs_reach_the_class(folders):
    pipe = load_pipeline(
        str(folders / "sd"), scheduler="euler", scheduler_kwargs={"use_karras_sigmas": True}
    )
    assert pipe.scheduler.config.use_karras_sigmas is True
    # kwargs on the sampler the pipeline already holds rebuild it too
    set_scheduler(pipe, "euler", {"timestep_spacing": "trailing"})
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_ddim_is_todays_output_and_euler_changes_the_image():
    """Today's generate was a plain pipe() call without generators on the loaded DDIM. On the
    toy world's trained model: a random tiny UNet barely depends on its input."""
    toy = str(pipeline_path())
    default = load_pipeline(toy)
    latents = noise(default)
    emb = encode_prompts(default, PROMPTS)
    cond, neg, neg_pooled = conditioning(default, emb, len(PROMPTS))
    plain = default(
        **adapter_for(default).call_kwargs(cond.embeds, cond.pooled, neg, neg_pooled),
        latents=latents,
        height=32,
        width=32,
        output_type="pt",
        **STEPS,
    ).images
    ddim = images(load_pipeline(toy, scheduler="ddim"), latents)
    assert torch.equal(images(default, latents), plain)
    assert torch.equal(ddim, plain)
    euler = images(load_pipeline(toy, scheduler="euler"), latents)
    assert euler.shape == ddim.shape and torch.isfinite(euler).all()
    # DDIM (eta = 0) takes Euler steps of the same ODE in sigma-space (Karras et al., arXiv
    # 2206.00364, Table 1): the images differ by the last step only (to sigma 0 here, to
    # alphas_cumprod[0] for DDIM); measured max 0.008 at 4 steps
    assert (euler - ddim).abs().max() > 1e-3


def test_dpmsolver_and_lcm_change_the_image_too():
    ddim = load_pipeline(str(pipeline_path()))
    latents = noise(ddim)
    reference = images(ddim, latents)
    for name in ("dpmsolver++", "lcm"):
        set_scheduler(ddim, name)
        assert (images(ddim, latents) - reference).abs().max() > 0.1, name  # measured 0.38, 0.85


def test_lcm_noise_between_steps_is_keyed_by_the_initial_noise(folders):
    """LCM draws fresh noise at every step but the last; it comes from the image's own noise,
    so neither the global RNG nor the batch around the image changes it."""
    pipe = load_pipeline(str(folders / "sd"), scheduler="lcm")
    latents = noise(pipe)
    torch.manual_seed(0)
    first = images(pipe, latents)
    torch.manual_seed(1)
    assert torch.equal(images(pipe, latents), first)
    alone = generate(
        pipe, encode_prompts(pipe, PROMPTS[:1]), latents[:1], output_type="pt", **STEPS
    )
    assert torch.allclose(alone, first[:1], atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_pipe_scales_passed_latents_by_init_noise_sigma(folders, family, monkeypatch):
    """Euler starts from sigma_max-sized latents: diffusers' pipe() multiplies the latents we pass
    by init_noise_sigma (SD and SDXL pipelines, the toy world's class included)."""
    pipe = load_pipeline(str(folders / family), scheduler="euler")
    latents = noise(pipe)
    seen = []
    scale = pipe.scheduler.scale_model_input

    def spy(sample, timestep):
        seen.append(sample.detach().clone())
        return scale(sample, timestep)

    monkeypatch.setattr(pipe.scheduler, "scale_model_input", spy)
    images(pipe, latents)
    assert pipe.scheduler.init_noise_sigma > 1
    first_step = seen[0][: len(PROMPTS)]  # CFG doubles the batch
    assert torch.allclose(first_step, latents * pipe.scheduler.init_noise_sigma)


def test_the_hand_written_ddim_steps_do_not_follow_the_sampler(folders):
    """Reward features, re-denoise and the search baselines build DDIM from the pipeline's config:
    the same steps whichever sampler the pipeline holds."""
    ddim = load_pipeline(str(folders / "sd"))
    latents = noise(ddim)
    emb = encode_prompts(ddim, PROMPTS)
    reference = denoise_step(ddim, latents, emb, **STEPS, step_index=1)
    for name in ("euler", "dpmsolver++", "lcm"):
        pipe = load_pipeline(str(folders / "sd"), scheduler=name)
        assert torch.equal(denoise_step(pipe, latents, emb, **STEPS, step_index=1), reference)


# ---- bad input: one line each ----------------------------------------------------------
def evaluate_args(folders, out, *extra, pipeline="sd", methods=None):
    return [
        "--pipeline",
        str(folders / pipeline),
        "--prompt_sets",
        json.dumps({"p": str(folders / "prompts.txt")}),
        "--judges",
        "shapes",
        "--methods",
        json.dumps(methods or {"standard": {"type": "standard"}}),
        "--seeds",
        "0:1",
        "--num_inference_steps",
        "2",
        "--report_to",
        "none",
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("config_cls", [EvaluateConfig, GenerateConfig, CollectConfig])
def test_an_unknown_name_is_refused_at_parse_time_listing_the_supported(config_cls):
    required = {
        EvaluateConfig: ["--pipeline", "p", "--prompt_sets", '{"a": "x.txt"}', "--judges",
                         "shapes", "--methods", '{"s": {"type": "standard"}}'],
        GenerateConfig: ["--projector", "q", "--prompt", "a"],
        CollectConfig: ["--pipeline", "p", "--judge", "shapes", "--prompts", "x.txt"],
    }[config_cls]  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        parse_config(config_cls, [*required, "--output_dir", "o", "--scheduler", "heun"])
    assert str(exc.value) == (
        f"recipe field 'scheduler' must be one of {NAMES}, got 'heun'; fix it in the YAML or on "
        "the command line"
    )


def test_kwargs_the_class_does_not_take_are_named_with_the_class():
    with pytest.raises(ConfigError) as exc:
        parse_config(
            CollectConfig,
            ["--pipeline", "p", "--judge", "shapes", "--prompts", "x.txt", "--output_dir", "o",
             "--scheduler", "euler", "--scheduler_kwargs", '{"eta": 0, "use_karras_sigmas": true}'],
        )  # fmt: skip
    message = str(exc.value)
    assert message.startswith(
        "recipe field 'scheduler_kwargs' has 'eta', which EulerDiscreteScheduler (scheduler "
        "'euler') does not accept; it accepts "
    )
    assert "use_karras_sigmas" in message and "\n" not in message
    assert message.endswith("; fix it in the YAML or on the command line")


def test_a_sampler_of_the_other_family_is_refused_before_the_weights_load(folders, monkeypatch):
    from diffusers import DiffusionPipeline

    def never(*args, **kwargs):
        raise AssertionError("the weights loaded before the sampler was checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", never)
    with pytest.raises(PipelineError) as exc:
        load_pipeline(str(folders / "sd"), scheduler="flow_euler")
    assert str(exc.value) == (
        f"scheduler 'flow_euler' does not fit pipeline '{folders / 'sd'}': its scheduler "
        "DDIMScheduler is DDPM-family, so use one of ddim, euler, dpmsolver++, lcm"
    )
    with pytest.raises(PipelineError) as exc:
        load_pipeline(str(folders / "flow"), scheduler="euler")
    assert str(exc.value) == (
        f"scheduler 'euler' does not fit pipeline '{folders / 'flow'}': its scheduler "
        "FlowMatchEulerDiscreteScheduler is flow-matching, so use one of flow_euler"
    )


def test_set_scheduler_checks_a_loaded_pipeline_too(folders):
    pipe = build_tiny_sd_pipeline()
    with pytest.raises(PipelineError, match=r"^scheduler 'flow_euler' does not fit pipeline "):
        set_scheduler(pipe, "flow_euler")
    with pytest.raises(PipelineError, match=r"^scheduler_kwargs has 'bogus', which LCMScheduler"):
        set_scheduler(pipe, "lcm", {"bogus": 1})
    with pytest.raises(PipelineError) as exc:
        set_scheduler(pipe, "euler", {"timestep_spacing": "sideways"})
    assert str(exc.value).startswith(
        "cannot build EulerDiscreteScheduler (scheduler 'euler') with scheduler_kwargs "
        "{'timestep_spacing': 'sideways'}: "
    )
    assert "\n" not in str(exc.value)
    assert type(pipe.scheduler) is DDIMScheduler  # a refused sampler leaves the old one in place


@pytest.mark.parametrize("kind", ["early_stop", "noise_diffusion"])
def test_methods_with_their_own_steps_refuse_another_sampler(kind):
    methods = {"standard": {"type": "standard"}, "search": {"type": kind}}
    with pytest.raises(ConfigError) as exc:
        EvaluateConfig(
            output_dir="o", pipeline="p", prompt_sets={"a": "x"}, judges=["shapes"],
            methods=methods, scheduler="euler",
        )  # fmt: skip
    assert str(exc.value) == (
        f"methods.search ({kind}) runs its own DDIM or flow-matching Euler steps and cannot use "
        "scheduler 'euler'; set scheduler: ddim (SD, SDXL) or flow_euler (SD3, FLUX), or leave "
        "the method out"
    )
    # best-of-N generates every candidate with pipe(), so any sampler works
    methods["search"] = {"type": "best_of_n"}
    assert EvaluateConfig(
        output_dir="o", pipeline="p", prompt_sets={"a": "x"}, judges=["shapes"],
        methods=methods, scheduler="euler",
    ).scheduler == "euler"  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scheduler", "heun"], r"recipe field 'scheduler' must be one of 'ddim'"),
        (["--scheduler", "flow_euler"], r"scheduler 'flow_euler' does not fit pipeline"),
        (["--scheduler", "lcm", "--scheduler_kwargs", '{"karras": 1}'], r"has 'karras', which"),
    ],
)
def test_the_cli_exits_2_with_one_line(folders, tmp_path, caplog, extra, message):
    with caplog.at_level(logging.ERROR, logger="noisealign"), pytest.raises(SystemExit) as exc:
        cli_main(["evaluate", *evaluate_args(folders, tmp_path / "out", *extra)])
    assert exc.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].strip(), errors
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out" / "recipe.json").exists()


# ---- recipes ------------------------------------------------------------------------------
def test_a_recipe_with_scheduler_euler_parses(tmp_path):
    text = (ROOT / "recipes" / "toy" / "evaluate.yaml").read_text()
    methods = "methods:\n  standard: {type: standard}\n  best_of_4: {type: best_of_n, n: 4}\n"
    start, end = text.index("methods:"), text.index("num_inference_steps:")
    recipe = tmp_path / "evaluate.yaml"
    recipe.write_text(
        text[:start] + methods + text[end:] + "scheduler: euler\n"
        "scheduler_kwargs: {use_karras_sigmas: true}\n"
    )
    config = parse_config(EvaluateConfig, ["--config", str(recipe)])
    assert (config.scheduler, config.scheduler_kwargs) == ("euler", {"use_karras_sigmas": True})
    collect = tmp_path / "collect.yaml"
    collect.write_text((ROOT / "recipes/toy/collect.yaml").read_text() + "scheduler: euler\n")
    assert parse_config(CollectConfig, ["--config", str(collect)]).scheduler == "euler"
    # the toy evaluate recipe's early_stop and noise_diffusion rows keep it on ddim
    with pytest.raises(ConfigError, match=r"^methods.early_stop_4 \(early_stop\) runs its own"):
        parse_config(
            EvaluateConfig,
            ["--config", str(ROOT / "recipes/toy/evaluate.yaml"), "--scheduler", "euler"],
        )


def test_only_another_sampler_enters_the_fingerprint():
    required = dict(output_dir="o", pipeline="p", judge="shapes", prompts="x.txt")
    plain = CollectConfig(**required).fingerprint()
    assert "scheduler" not in plain and "scheduler_kwargs" not in plain  # old folders resume
    euler = CollectConfig(**required, scheduler="euler").fingerprint()
    assert (euler["scheduler"], euler["scheduler_kwargs"]) == ("euler", {})
    assert {k: v for k, v in euler.items() if not k.startswith("scheduler")} == plain


def test_evaluate_with_euler_reports_it_and_refuses_a_ddim_rerun_in_its_folder(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle left of a blue square\n")
    args = [
        "--pipeline", str(pipeline_path()), "--prompt_sets", json.dumps({"p": str(prompts)}),
        "--judges", "shapes", "--methods", '{"standard": {"type": "standard"}}', "--seeds",
        "0:1", "--num_inference_steps", "4", "--report_to", "none", "--num_threads", "1",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    report = evaluate.main([*args, "--scheduler", "euler"])
    assert (report["scheduler"], report["scheduler_kwargs"]) == ("euler", {})
    assert "4 steps of `euler`" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(DataError, match=r"differs in: scheduler, scheduler_kwargs"):
        evaluate.main(args)
