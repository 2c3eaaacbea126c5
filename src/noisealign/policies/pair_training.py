"""A policy regressed onto noise pairs (train_npnet): built for a pipeline, the loss of a batch,
the held-out evaluation, and the step the training loop runs.

The loss is the MSE of Golden Noise (arXiv 2411.09502, Alg. 2) between the policy's ε′ and the
pair's target x′_T (:func:`noisealign.losses.noise_pairs.noise_pair_loss`); every sample is
conditioned on its own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.npd import NoisePairs
from ..errors import ConfigError, PipelineError
from ..losses.noise_pairs import noise_pair_loss
from ..pipelines import encode_prompts
from ..training import StepRecord
from . import POLICIES
from .training import noise_metrics


def build_policy(config: Any, signature: dict, shape: tuple[int, int, int]):
    """A fresh policy (NPNet or noise projector) whose input sizes come from the pipeline and the
    pairs, its size from the recipe."""
    if config.policy_type in ("npnet", "noise_projector"):
        fields = dict(
            latent_channels=shape[0],
            text_dim=signature["text_embed_dim"],
            pooled_dim=signature["pooled_dim"],
        )
    else:  # the official architecture: one square 4-channel size, flattened (L, D) tokens
        if shape[0] != 4 or shape[1] != shape[2]:
            raise PipelineError(
                f"policy_type 'npnet_compat' takes square 4-channel latents, the pairs have "
                f"{shape}; use policy_type 'npnet'"
            )
        fields = dict(
            resolution=shape[1],
            text_dim=signature["text_embed_dim"],
            text_length=signature["text_length"],
        )
    cls = POLICIES[config.policy_type]
    try:
        policy_config = cls.config_class(
            **{**fields, **config.policy_kwargs},
            pipeline_signature=signature,
            pipeline=config.pipeline,
        )
    except TypeError as exc:  # an unknown policy_kwargs key
        raise ConfigError(
            f"recipe field 'policy_kwargs' does not fit {cls.config_class.__name__}: {exc}"
        ) from exc
    torch.manual_seed(config.seed)  # the same initial weights on every process
    return cls(policy_config)


def batch_loss(
    model, pipe, pairs, batch: dict
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(loss, ε′, metrics) of one batch; each sample conditioned on its own prompt."""
    emb = encode_prompts(pipe, [pairs.prompts[r] for r in batch["row"].tolist()])
    emb = emb.to(batch["source"].device, torch.float32)
    predicted = model(batch["source"], emb.embeds, emb.mask, emb.pooled)
    loss, metrics = noise_pair_loss(predicted, batch["target"], batch["source"])
    return loss, predicted.detach(), metrics


@torch.no_grad()
def evaluate(accelerator, model, pipe, pairs, loader) -> dict[str, float]:
    """Held-out MSE, the identity map's MSE, and ε′'s Gaussianity, over the whole held-out set.

    Every process scores every held-out pair (the set is small), so all log the same numbers.
    """
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        _, predicted, metrics = batch_loss(model, pipe, pairs, batch)
        n = len(batch["row"])
        for key, value in {**metrics, **noise_metrics(predicted, "eps_prime")}.items():
            sums[key] = sums.get(key, 0.0) + value * n
        count += n
    model.train()
    values = {k: v / count for k, v in sums.items()}
    values["relative_mse"] = values["mse"] / max(values["identity_mse"], 1e-12)
    return values


@dataclass
class NPNetStep:
    """train_npnet's forward and what each optimizer step logs (the last forward's ε′ feeds the
    noise statistics of the logged steps)."""

    accelerator: Any
    model: Any
    scheduler: Any
    pipe: Any
    pairs: NoisePairs
    logging_steps: int
    predicted: torch.Tensor | None = None

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss, self.predicted, metrics = batch_loss(self.model, self.pipe, self.pairs, batch)
        return loss, metrics

    def log(self, record: StepRecord) -> dict[str, float]:
        logged = {
            "step": record.step,
            "epoch": record.epoch,
            "loss": self.accelerator.reduce(record.loss.detach(), reduction="mean").item(),
            "lr": self.scheduler.get_last_lr()[0],
            **record.metrics,
        }
        if record.grad_norm is not None:
            logged["grad_norm"] = float(record.grad_norm)
        if record.step % self.logging_steps == 0 or record.step == 1:
            logged |= noise_metrics(self.predicted, "eps_prime")
            self.accelerator.log({f"train/{k}": v for k, v in logged.items()}, step=record.step)
            relative = f"{record.metrics['relative_mse']:.3f}"
            record.progress.set_postfix(loss=f"{logged['loss']:.4f}", rel=relative)
        return logged
