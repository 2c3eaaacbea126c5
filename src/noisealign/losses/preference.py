"""Losses of the train_projector stage: quasi-DPO, the reward-gradient ablation, a Gaussianity
penalty.

Quasi-DPO (our formulation; derivation in ``docs/method.md``). The projector f_θ is
deterministic, so the policy is a surrogate Gaussian π_θ(x | ε, e) = N(f_θ(ε, e), σ²I) with
log π(x) = −‖x − mean‖² / (2σ²) (+ a constant that cancels). For a pair (x_w, x_l) of
candidates of one (ε, e), with the reference mean f_ref(ε, e):

    Δ = [log π_θ(x_w) − log π_ref(x_w)] − [log π_θ(x_l) − log π_ref(x_l)]
      = ⟨x_w − x_l, f_θ − f_ref⟩ / σ²                 (the ‖·‖² terms cancel)

and, as in DPO (Rafailov et al. 2023, arXiv 2305.18290) with TRL's ``loss_type`` names:

    sigmoid: L = −log σ(β·Δ)                            (DPO)
    ipo:     L = (Δ − 1/(2β))²                           (IPO, Azar et al. 2023, arXiv 2310.12036)
    hinge:   L = relu(1 − β·Δ)                           (SLiC, Zhao et al. 2023, arXiv 2305.10425)

TRL's IPO divides the log-ratios by the sequence length; a noise has no length, so Δ is used
as is. ``rpo_alpha`` adds TRL's RPO term (Pang et al. 2024, arXiv 2404.19733): α times the
negative log-likelihood of the winner under π_θ, averaged over the noise's n values as TRL
averages over tokens,

    L_RPO = L + α · ‖x_w − f_θ‖² / (2σ²·n),

a regression of f_θ onto the chosen candidate that anchors the otherwise scale-free preference
term. All functions are pure: tensors in, ``(loss, metrics)`` out; ``log σ`` is ``F.logsigmoid``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; mean, σ²I) up to its constant: −‖x − mean‖² / (2σ²), one value per sample (B,)."""
    return -(x - mean).float().flatten(1).pow(2).sum(1) / (2 * sigma**2)


def quasi_dpo_loss(
    policy_mean: torch.Tensor,
    ref_mean: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    *,
    sigma: float,
    beta: float,
    loss_type: str = "sigmoid",
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Quasi-DPO loss over P pairs; every tensor is ``(P, C, H, W)``, row p one pair of one (ε, e).

    Δ_p = [log π_θ(w) − log π_ref(w)] − [log π_θ(l) − log π_ref(l)] with log π from
    :func:`gaussian_log_prob`; L = mean_p of −log σ(βΔ) | (Δ − 1/(2β))² | relu(1 − βΔ),
    plus ``rpo_alpha`` · mean_p ‖w − f_θ‖² / (2σ²·n) when ``rpo_alpha`` > 0 (``loss/nll``).
    Metrics (TRL's names): ``rewards/chosen`` = β·mean[log π_θ(w) − log π_ref(w)],
    ``rewards/rejected`` likewise for l, ``rewards/margins`` = β·mean Δ,
    ``rewards/accuracies`` = share of pairs with Δ > 0 (the implicit accuracy).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if sigma <= 0 or beta <= 0:
        raise ValueError(f"sigma and beta must be > 0, got sigma={sigma}, beta={beta}")
    if rpo_alpha < 0:
        raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    chosen_logratio = gaussian_log_prob(winners, policy_mean, sigma) - gaussian_log_prob(
        winners, ref_mean, sigma
    )
    rejected_logratio = gaussian_log_prob(losers, policy_mean, sigma) - gaussian_log_prob(
        losers, ref_mean, sigma
    )
    delta = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * delta)
    loss = losses.mean()
    metrics = {"loss/preference": loss.item()}
    if rpo_alpha > 0:
        nll = -gaussian_log_prob(winners, policy_mean, sigma) / winners[0].numel()
        loss = loss + rpo_alpha * nll.mean()
        metrics["loss/nll"] = nll.mean().item()
    metrics |= {
        "rewards/chosen": beta * chosen_logratio.mean().item(),
        "rewards/rejected": beta * rejected_logratio.mean().item(),
        "rewards/margins": beta * delta.mean().item(),
        "rewards/accuracies": (delta > 0).float().mean().item(),
        "pairs": float(delta.numel()),
    }
    return loss, metrics


def reward_gradient_loss(reward_logit: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L = −mean r_φ(f_θ(ε, e)): the ablation that climbs the reward model directly.

    ``reward_logit`` (B,) must be differentiable with respect to θ (through r_φ). It has no
    reference and no pairs: the projector is free to exploit r_φ's errors off the noise
    manifold, which the preference form's bounded, reference-anchored objective avoids.
    """
    loss = -reward_logit.float().mean()
    return loss, {"loss/reward_gradient": loss.item()}


def lag1_autocorrelation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean products of horizontal and vertical neighbours of ``x`` (B, C, H, W): (B,),
    (B,).

    For white N(0, 1) noise both are 0 with standard deviation ≈ 1/√n; a smooth (low-frequency)
    ε′ — one a per-value test cannot see — has them near 1.
    """
    x = x.float()
    horizontal = (x[..., :, 1:] * x[..., :, :-1]).flatten(1).mean(1)
    vertical = (x[..., 1:, :] * x[..., :-1, :]).flatten(1).mean(1)
    return horizontal, vertical


def gaussianity_penalty(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Moment and correlation mismatch of ``x`` (B, ...) with white N(0, I), averaged over samples.

    With m_k = mean(x^k) per sample and ρ_h, ρ_v the lag-1 products (:func:`lag1_autocorrelation`),

        G = m1² + (m2 − 1)²/2 + m3²/15 + (m4 − 3)²/96 + ρ_h² + ρ_v²

    Each term is weighted by the inverse variance of its single-value estimator under N(0, 1)
    (Var x = 1, Var x² = 2, Var x³ = 15, Var x⁴ = 96), a Jarque–Bera-like statistic, so
    n·G is O(1) for genuine Gaussian noise of n values. ``x`` of 2 dims has no ρ terms.
    """
    flat = x.float().flatten(1)
    m1, m2, m3, m4 = (flat.pow(k).mean(1) for k in (1, 2, 3, 4))
    per_sample = m1**2 + (m2 - 1) ** 2 / 2 + m3**2 / 15 + (m4 - 3) ** 2 / 96
    metrics = {"skew_m3": m3.mean().item(), "kurtosis_m4": m4.mean().item()}
    if x.ndim == 4:
        rho_h, rho_v = lag1_autocorrelation(x)
        per_sample = per_sample + rho_h**2 + rho_v**2
        metrics |= {"autocorr_h": rho_h.mean().item(), "autocorr_v": rho_v.mean().item()}
    penalty = per_sample.mean()
    return penalty, {"loss/gaussianity": penalty.item(), **metrics}
