"""The methods an evaluate recipe can compare, by type name.

A recipe's ``methods`` maps a label to settings with a ``type``::

    methods:
      standard: {type: standard}
      projector: {type: policy, policy: outputs/toy/train_projector}
      best_of_4: {type: best_of_n, n: 4}
      early_stop_4: {type: early_stop, n: 4, stop_step: 5}
      noise_diffusion: {type: noise_diffusion, rounds: 1, num_candidates: 4}

Each factory takes the :class:`EvalContext` and the settings and returns a callable
``run(prompts, prompt_ids, concepts, seeds) -> MethodOutput`` for one batch of (prompt, seed)
pairs. Every method starts from the same standard noise ``batch_noise(prompt_id, seed)``:
search methods use it as their first candidate, policies map it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..baselines import (
    MethodOutput,
    best_of_n,
    candidate_noise,
    early_stop_best_of_n,
    noise_diffusion,
)
from ..errors import ConfigError
from ..judges import Concept, Judge, build_judge
from ..noise import batch_noise
from ..pipelines import encode_prompts, generate
from ..policies import load_policy, project

Run = Callable[[list[str], list[str], list[list[Concept] | None], list[int]], MethodOutput]


@dataclass
class EvalContext:
    """What every method shares: the pipeline, sampling settings and the judges built so far."""

    pipe: Any
    latent_shape: tuple[int, ...]
    num_inference_steps: int
    guidance_scale: float
    default_judge: str
    judge_kwargs: dict[str, dict] = field(default_factory=dict)
    judges: dict[str, Judge] = field(default_factory=dict)

    def judge(self, name: str | None) -> Judge:
        """The judge ``name`` (default: the first evaluation judge), built once."""
        name = name or self.default_judge
        if name not in self.judges:
            self.judges[name] = build_judge(name, **self.judge_kwargs.get(name, {}))
        return self.judges[name]

    @property
    def sampling(self) -> dict[str, Any]:
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }


def _standard(ctx: EvalContext) -> Run:
    def run(prompts, prompt_ids, concepts, seeds):
        noise = batch_noise(prompt_ids, seeds, ctx.latent_shape)
        images = generate(ctx.pipe, encode_prompts(ctx.pipe, prompts), noise, **ctx.sampling)
        steps = [float(ctx.num_inference_steps)] * len(prompts)
        return MethodOutput(images, noise, steps, [0] * len(prompts))

    return run


def _policy(ctx: EvalContext, policy: str) -> Run:
    model = load_policy(policy, ctx.pipe).to(ctx.pipe._execution_device)

    def run(prompts, prompt_ids, concepts, seeds):
        emb = encode_prompts(ctx.pipe, prompts)
        noise = project(model, batch_noise(prompt_ids, seeds, ctx.latent_shape), emb)
        images = generate(ctx.pipe, emb, noise, **ctx.sampling)
        steps = [float(ctx.num_inference_steps)] * len(prompts)
        return MethodOutput(images, noise.cpu().float(), steps, [0] * len(prompts))

    return run


def _best_of_n(ctx: EvalContext, n: int = 4, judge: str | None = None) -> Run:
    scorer = ctx.judge(judge)

    def run(prompts, prompt_ids, concepts, seeds):
        candidates = candidate_noise(prompt_ids, seeds, n, ctx.latent_shape)
        emb = encode_prompts(ctx.pipe, prompts)
        return best_of_n(
            ctx.pipe, emb, prompts, candidates, scorer, concepts=concepts, **ctx.sampling
        )

    return run


def _early_stop(
    ctx: EvalContext, n: int = 4, stop_step: int = 5, preview: str = "vae", judge: str | None = None
) -> Run:
    if not 0 < stop_step < ctx.num_inference_steps:
        raise ConfigError(
            f"early_stop: stop_step must be in 1..{ctx.num_inference_steps - 1} "
            f"(num_inference_steps), got {stop_step}"
        )
    scorer = ctx.judge(judge)

    def run(prompts, prompt_ids, concepts, seeds):
        candidates = candidate_noise(prompt_ids, seeds, n, ctx.latent_shape)
        emb = encode_prompts(ctx.pipe, prompts)
        return early_stop_best_of_n(
            ctx.pipe,
            emb,
            prompts,
            candidates,
            scorer,
            stop_step=stop_step,
            preview=preview,
            concepts=concepts,
            **ctx.sampling,
        )

    return run


def _noise_diffusion(
    ctx: EvalContext, rounds: int = 1, num_candidates: int = 4, judge: str | None = None
) -> Run:
    scorer = ctx.judge(judge)

    def run(prompts, prompt_ids, concepts, seeds):
        noise = batch_noise(prompt_ids, seeds, ctx.latent_shape)
        emb = encode_prompts(ctx.pipe, prompts)
        return noise_diffusion(
            ctx.pipe,
            emb,
            prompts,
            noise,
            scorer,
            rounds=rounds,
            num_candidates=num_candidates,
            prompt_ids=prompt_ids,
            seeds=seeds,
            **ctx.sampling,
        )

    return run


METHODS: dict[str, Callable[..., Run]] = {
    "standard": _standard,  # the plain Gaussian noise
    "policy": _policy,  # a trained noise projector or NPNet folder
    "best_of_n": _best_of_n,  # N candidates, keep the judge's best
    "early_stop": _early_stop,  # NoisyCLIP-style: judge previews after stop_step steps
    "noise_diffusion": _noise_diffusion,  # gradient-guided noise search (arXiv 2411.16503)
}


# methods that run their own steps (previews, finish, the gradient replay) instead of pipe():
# they run the family's sampler (noisealign.pipelines.steps), so under another one they would
# not be compared on the other methods' sampler
OWN_STEPS = ("early_stop", "noise_diffusion")
STEPPING_SAMPLERS = ("ddim", "flow_euler")


def check_sampler(label: str, kind: str, scheduler: str) -> None:
    """:class:`ConfigError` if recipe entry ``methods.<label>`` of type ``kind`` cannot run under
    the recipe's ``scheduler``."""
    if kind in OWN_STEPS and scheduler not in STEPPING_SAMPLERS:
        raise ConfigError(
            f"methods.{label} ({kind}) runs its own DDIM or flow-matching Euler steps and cannot "
            f"use scheduler '{scheduler}'; set scheduler: ddim (SD, SDXL) or flow_euler (SD3, "
            "FLUX), or leave the method out"
        )


def build_method(label: str, settings: dict, ctx: EvalContext) -> Run:
    """The run function of recipe entry ``methods.<label>``; :class:`ConfigError` on bad
    settings."""
    settings = dict(settings)
    kind = settings.pop("type", None)
    if kind not in METHODS:
        raise ConfigError(
            f"methods.{label}: unknown type {kind!r}; choose one of {', '.join(METHODS)}"
        )
    try:
        return METHODS[kind](ctx, **settings)
    except TypeError as exc:
        raise ConfigError(f"methods.{label} ({kind}): {exc}; fix the recipe entry") from exc
