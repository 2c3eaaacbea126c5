"""Reward losses against values computed by hand."""

import math

import pytest
import torch

from noisealign.losses.reward import (
    overall_loss,
    pairwise_ranking_loss,
    reward_loss,
    token_bce_loss,
)


def bce(z, t):
    p = 1 / (1 + math.exp(-z))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


def test_token_bce_is_masked_mean_over_scored_tokens():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 5.0, 0.5]])
    targets = torch.tensor([[1.0, 0.25, 0.0], [0.5, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, metrics = token_bce_loss(logits, targets, mask)
    expected = (bce(0.0, 1.0) + bce(2.0, 0.25) + bce(1.0, 0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["scored_tokens"] == 3


def test_token_bce_without_scored_tokens_is_zero():
    loss, _ = token_bce_loss(
        torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    )
    assert loss.item() == 0.0


def test_overall_bce_and_mse():
    logits, targets = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 0.0])
    loss, _ = overall_loss(logits, targets, "bce")
    assert loss.item() == pytest.approx((bce(0.0, 1.0) + bce(3.0, 0.0)) / 2, rel=1e-6)
    loss, _ = overall_loss(logits, targets, "mse")
    s = 1 / (1 + math.exp(-3.0))
    assert loss.item() == pytest.approx(((0.5 - 1) ** 2 + s**2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="'bce' or 'mse'"):
        overall_loss(logits, targets, "l1")


def test_pairwise_ranking_compares_only_seeds_of_one_prompt():
    # prompt 0: rows 0, 1, 2 with judge 1.0, 0.0, 0.5; prompt 1: rows 3, 4 tied (no pair)
    logits = torch.tensor([1.0, 2.0, 0.0, 5.0, -5.0])
    targets = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1])
    loss, metrics = pairwise_ranking_loss(logits, targets, group)
    # pairs (winner, loser): (0, 1): s diff -1; (0, 2): +1; (2, 1): -2
    expected = (
        math.log1p(math.exp(1.0)) + math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))
    ) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["pairs"] == 3 and metrics["rank_accuracy"] == pytest.approx(1 / 3)
    loss, metrics = pairwise_ranking_loss(logits, targets, group, margin=0.6)
    assert metrics["pairs"] == 1 and loss.item() == pytest.approx(math.log1p(math.exp(1.0)))


def test_pairwise_without_pairs_is_zero_and_keeps_the_graph():
    logits = torch.tensor([1.0, 2.0], requires_grad=True)
    loss, metrics = pairwise_ranking_loss(logits, torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    assert loss.item() == 0.0 and metrics["pairs"] == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2))


def test_reward_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    z, s = torch.randn(4, 5), torch.randn(4)
    t, m = torch.rand(4, 5), torch.rand(4, 5) > 0.3
    y, g = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    total, metrics = reward_loss(
        z, s, t, m, y, g, token_weight=0.5, overall_weight=2.0, rank_weight=3.0
    )
    parts = (
        0.5 * token_bce_loss(z, t, m)[0]
        + 2.0 * overall_loss(s, y)[0]
        + 3.0 * pairwise_ranking_loss(s, y, g)[0]
    )
    assert total.item() == pytest.approx(parts.item(), rel=1e-6)
    assert {"token_bce", "overall_bce", "rank_loss", "pairs", "loss"} <= set(metrics)


def test_large_logits_stay_finite():
    logits = torch.tensor([200.0, -200.0])
    loss, _ = pairwise_ranking_loss(logits, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(400.0)
