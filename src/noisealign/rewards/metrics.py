"""Held-out metrics of a reward model against the judge.

- token AUC: ranks scored tokens by predicted logit against the judge's binarised token
  score (≥ 0.5 means "this part is in the image"); Mann–Whitney U with ties counted half.
- overall Spearman ρ between predicted and judge overall scores (scipy).
- pairwise accuracy: over pairs of seeds of the *same prompt* that the judge scores
  differently, the fraction the model orders the same way; a tie in the prediction counts
  half, so a predictor that ignores the noise scores exactly 0.5.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import rankdata, spearmanr


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for boolean ``labels``; NaN when one class is absent."""
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = rankdata(scores)  # average ranks: ties count half
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def token_auc(
    token_logits: torch.Tensor,
    token_targets: torch.Tensor,
    token_mask: torch.Tensor,
    threshold: float = 0.5,
) -> float:
    """AUC over all scored tokens (B, L) of the predicted logits for ``target >= threshold``."""
    mask = _np(token_mask).astype(bool)
    return binary_auc(_np(token_logits)[mask], _np(token_targets)[mask] >= threshold)


def spearman(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Spearman ρ of two (B,) tensors; NaN when either is constant."""
    a, b = _np(predicted), _np(target)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(spearmanr(a, b).statistic)


def pairwise_accuracy(
    predicted: torch.Tensor, target: torch.Tensor, group: torch.Tensor, tie: float = 1e-6
) -> tuple[float, int]:
    """``(accuracy, pairs)`` over same-group pairs with ``|Δtarget| > tie``; prediction ties
    count half."""
    p, t, g = _np(predicted), _np(target), group.detach().cpu().numpy()
    correct, pairs = 0.0, 0
    for value in np.unique(g):
        idx = np.flatnonzero(g == value)
        dt = t[idx][:, None] - t[idx][None, :]
        dp = p[idx][:, None] - p[idx][None, :]
        judged = dt > tie  # each unordered pair once, oriented so the judge prefers i
        pairs += int(judged.sum())
        correct += float((dp[judged] > 0).sum() + 0.5 * (dp[judged] == 0).sum())
    return (correct / pairs if pairs else math.nan), pairs


def reward_metrics(
    token_logits: torch.Tensor,
    overall_logit: torch.Tensor,
    token_targets: torch.Tensor,
    token_mask: torch.Tensor,
    overall_target: torch.Tensor,
    group: torch.Tensor,
) -> dict[str, float]:
    """All held-out metrics in one dict (the keys the model card and wandb show)."""
    accuracy, pairs = pairwise_accuracy(overall_logit, overall_target, group)
    return {
        "token_auc": token_auc(token_logits, token_targets, token_mask),
        "spearman": spearman(overall_logit, overall_target),
        "pairwise_accuracy": accuracy,
        "pairs": float(pairs),
        "rows": float(len(overall_target)),
    }
