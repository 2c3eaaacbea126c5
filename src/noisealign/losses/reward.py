"""Losses of the distill stage: token BCE, overall BCE/MSE and a pairwise ranking term.

Notation: s_i the predicted overall logit of row i, y_i ∈ [0, 1] the judge's overall score,
z_{i,l} and t_{i,l} ∈ [0, 1] the predicted token logits and the judge's soft token targets,
m_{i,l} ∈ {0, 1} the scored-token mask, g_i the row's prompt.

- Token BCE on soft targets, averaged over scored tokens only:
  L_tok = −Σ m·[t·log σ(z) + (1−t)·log σ(−z)] / Σ m
- Overall: BCE as above on (s, y), or MSE between σ(s) and y.
- Pairwise ranking (RankNet, Burges et al. 2005, ICML; the Bradley–Terry model behind
  reward-model training in Ouyang et al. 2022, arXiv 2203.02155): for every pair (i, j) of
  the same prompt with y_i − y_j > margin, L_rank = −mean log σ(s_i − s_j). Only seeds of
  one prompt are compared, so the term teaches what the noise contributes, which a
  prompt-only predictor cannot.

All functions are pure: tensors in, ``(loss, metrics)`` out; ``log σ`` is ``F.logsigmoid``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_bce_loss(
    token_logits: torch.Tensor, token_targets: torch.Tensor, token_mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_tok: BCE on soft targets (B, L) masked to scored tokens; 0 when no token is scored."""
    mask = token_mask.to(token_logits.dtype)
    per_token = F.binary_cross_entropy_with_logits(token_logits, token_targets, reduction="none")
    scored = mask.sum()
    loss = (per_token * mask).sum() / scored.clamp(min=1)
    return loss, {"token_bce": loss.item(), "scored_tokens": scored.item()}


def overall_loss(
    overall_logit: torch.Tensor, overall_target: torch.Tensor, kind: str = "bce"
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_all: ``"bce"`` on the logit (B,) or ``"mse"`` between σ(logit) and the score."""
    if kind == "bce":
        loss = F.binary_cross_entropy_with_logits(overall_logit, overall_target)
    elif kind == "mse":
        loss = F.mse_loss(torch.sigmoid(overall_logit), overall_target)
    else:
        raise ValueError(f"overall loss kind must be 'bce' or 'mse', got {kind!r}")
    return loss, {f"overall_{kind}": loss.item()}


def pairwise_ranking_loss(
    overall_logit: torch.Tensor,
    overall_target: torch.Tensor,
    group: torch.Tensor,
    margin: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_rank = −mean over pairs (i, j), g_i = g_j, y_i − y_j > margin, of log σ(s_i − s_j).

    ``group`` (B,) long: the prompt of each row. Returns a zero loss (still attached to the
    graph) when the batch holds no such pair; ``pairs`` counts them and ``rank_accuracy`` is
    the fraction with s_i > s_j.
    """
    same_prompt = group[:, None] == group[None, :]
    better = (overall_target[:, None] - overall_target[None, :]) > margin
    pairs = same_prompt & better
    n_pairs = int(pairs.sum())
    if n_pairs == 0:
        zero = overall_logit.sum() * 0.0
        return zero, {"rank_loss": 0.0, "pairs": 0.0, "rank_accuracy": float("nan")}
    logit_diff = overall_logit[:, None] - overall_logit[None, :]
    loss = -F.logsigmoid(logit_diff[pairs]).mean()
    accuracy = (logit_diff[pairs] > 0).float().mean().item()
    return loss, {"rank_loss": loss.item(), "pairs": float(n_pairs), "rank_accuracy": accuracy}


def reward_loss(
    token_logits: torch.Tensor,
    overall_logit: torch.Tensor,
    token_targets: torch.Tensor,
    token_mask: torch.Tensor,
    overall_target: torch.Tensor,
    group: torch.Tensor,
    *,
    token_weight: float = 1.0,
    overall_weight: float = 1.0,
    rank_weight: float = 1.0,
    overall_kind: str = "bce",
    rank_margin: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = token_weight·L_tok + overall_weight·L_all + rank_weight·L_rank (see the module
    docstring)."""
    l_tok, m_tok = token_bce_loss(token_logits, token_targets, token_mask)
    l_all, m_all = overall_loss(overall_logit, overall_target, overall_kind)
    l_rank, m_rank = pairwise_ranking_loss(overall_logit, overall_target, group, rank_margin)
    loss = token_weight * l_tok + overall_weight * l_all + rank_weight * l_rank
    return loss, {"loss": loss.item(), **m_tok, **m_all, **m_rank}
