"""Held-out metrics on hand-checked inputs."""

import math

import pytest
import torch

from noisealign.rewards.metrics import pairwise_accuracy, reward_metrics, spearman, token_auc


def test_token_auc_counts_only_scored_tokens_and_ties_half():
    logits = torch.tensor([[3.0, 1.0, 9.0], [1.0, 0.0, -9.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.75, 0.25, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    # positives 3.0, 1.0 (target .75) vs negatives 1.0, 0.0: pairs 3>1, 3>0, 1=1 (half), 1>0
    assert token_auc(logits, targets, mask) == pytest.approx(3.5 / 4)
    assert math.isnan(token_auc(logits, torch.ones(2, 3), mask))


def test_spearman_and_constant_inputs():
    assert spearman(
        torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])
    ) == pytest.approx(0.5)
    assert math.isnan(spearman(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])))


def test_pairwise_accuracy_within_prompts_only():
    pred = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.2, 7.0])
    judge = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    # prompt 0: (0>1) right, (0>2) right; prompt 1: tie in prediction -> half; prompt 2: no pair
    accuracy, pairs = pairwise_accuracy(pred, judge, group)
    assert pairs == 3 and accuracy == pytest.approx(2.5 / 3)
    constant = torch.zeros(6)
    assert pairwise_accuracy(constant, judge, group) == (0.5, 3)


def test_reward_metrics_keys():
    values = reward_metrics(
        torch.randn(4, 3),
        torch.randn(4),
        torch.rand(4, 3),
        torch.ones(4, 3, dtype=torch.bool),
        torch.tensor([1.0, 0.0, 1.0, 0.0]),
        torch.tensor([0, 0, 1, 1]),
    )
    assert set(values) == {"token_auc", "spearman", "pairwise_accuracy", "pairs", "rows"}
    assert values["pairs"] == 2 and values["rows"] == 4
