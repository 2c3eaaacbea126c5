"""The prompt-only baseline: predicts the judge from the prompt embeddings alone.

Closed-form ridge regressions: the overall score from the mask-averaged token embeddings,
each token's score from that token's embedding. It sees no noise, so it gives every seed of
a prompt the same score and its pairwise accuracy is 0.5 by construction; its token AUC and
Spearman ρ show how much of the judge's verdict the prompt alone explains (some prompts are
simply harder), which the noise-aware model must beat to be worth anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Weights (D + 1,) minimising ‖[x, 1]·w − y‖² + l2·‖w‖² (bias included, float64)."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    gram = x.T @ x + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ y.double())


@dataclass
class PromptOnlyBaseline:
    """Ridge predictors of the overall and token scores from the prompt alone."""

    overall_weights: torch.Tensor
    token_weights: torch.Tensor

    @staticmethod
    def _pooled(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(embeds.dtype)[..., None]
        return (embeds * m).sum(1) / m.sum(1).clamp(min=1)

    @classmethod
    def fit(
        cls,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        token_targets: torch.Tensor,
        token_mask: torch.Tensor,
        overall: torch.Tensor,
        l2: float = 1.0,
    ) -> PromptOnlyBaseline:
        """Fit on training rows: ``embeds`` (N, L, D) and ``mask`` (N, L) of each row's prompt."""
        overall_w = _ridge(cls._pooled(embeds, mask), overall, l2)
        scored = token_mask.bool()
        token_w = _ridge(embeds[scored], token_targets[scored], l2)
        return cls(overall_w, token_w)

    def predict(
        self, embeds: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token scores (N, L), overall (N,))`` for rows with prompt ``embeds`` (N, L, D)."""
        pooled = self._pooled(embeds, mask).double()
        overall = pooled @ self.overall_weights[:-1] + self.overall_weights[-1]
        tokens = embeds.double() @ self.token_weights[:-1] + self.token_weights[-1]
        return tokens.float(), overall.float()
