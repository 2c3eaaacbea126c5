"""Quasi-DPO, reward-gradient and Gaussianity losses against values computed by hand."""

import math

import pytest
import torch

from noisealign.losses.preference import (
    gaussian_log_prob,
    gaussianity_penalty,
    quasi_dpo_loss,
    reward_gradient_loss,
)


def t(*values):
    return torch.tensor([values])  # one pair, 2 values per "noise"


def test_gaussian_log_prob_by_hand():
    assert gaussian_log_prob(t(1.0, 2.0), t(0.0, 0.0), 2.0).item() == pytest.approx(-5 / 8)


# policy mean f = (1, 0), ref mean (0, 0), winner (1, 1), loser (-1, 0), sigma 1:
# log pi_theta(w) - log pi_ref(w) = -(0 + 1)/2 + (1 + 1)/2 = 0.5
# log pi_theta(l) - log pi_ref(l) = -(4 + 0)/2 + (1 + 0)/2 = -1.5      so  delta = 2
# (= <w - l, f - ref> / sigma^2 = <(2, 1), (1, 0)> = 2)
PAIR = dict(policy_mean=t(1.0, 0.0), ref_mean=t(0.0, 0.0), winners=t(1.0, 1.0), losers=t(-1.0, 0.0))


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("sigmoid", math.log1p(math.exp(-0.5 * 2))),  # -log sigmoid(beta * delta), beta 0.5
        ("ipo", (2 - 1 / (2 * 0.5)) ** 2),  # (delta - 1/(2 beta))^2 = 1
        ("hinge", 0.0),  # relu(1 - 0.5 * 2)
    ],
)
def test_quasi_dpo_loss_types(loss_type, expected):
    loss, m = quasi_dpo_loss(**PAIR, sigma=1.0, beta=0.5, loss_type=loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.25) and m["rewards/rejected"] == pytest.approx(
        -0.75
    )
    assert m["rewards/margins"] == pytest.approx(1.0) and m["rewards/accuracies"] == 1.0


def test_sigma_scales_delta_as_one_over_sigma_squared():
    _, m = quasi_dpo_loss(**PAIR, sigma=2.0, beta=1.0, loss_type="sigmoid")
    assert m["rewards/margins"] == pytest.approx(2 / 4)


def test_identity_policy_gives_zero_delta_and_log2_loss():
    pair = {**PAIR, "policy_mean": PAIR["ref_mean"]}
    loss, m = quasi_dpo_loss(**pair, sigma=1.0, beta=3.0)
    assert loss.item() == pytest.approx(math.log(2)) and m["rewards/accuracies"] == 0.0


def test_gradient_moves_policy_towards_winner_minus_loser():
    mean = torch.zeros(1, 2, requires_grad=True)
    loss, _ = quasi_dpo_loss(
        mean, torch.zeros(1, 2), t(1.0, 1.0), t(-1.0, 0.0), sigma=1.0, beta=1.0
    )
    loss.backward()
    # dL/df = -beta * sigmoid(-0) * (w - l) / sigma^2 = -0.5 * (2, 1)
    assert torch.allclose(mean.grad, torch.tensor([[-1.0, -0.5]]))


def test_rpo_alpha_adds_the_winners_per_value_nll():
    # ||w - f||^2 = (1-1)^2 + (1-0)^2 = 1 over n = 2 values, sigma 1: NLL = 1 / (2 * 1 * 2) = 0.25
    plain, _ = quasi_dpo_loss(**PAIR, sigma=1.0, beta=0.5)
    loss, m = quasi_dpo_loss(**PAIR, sigma=1.0, beta=0.5, rpo_alpha=2.0)
    assert m["loss/nll"] == pytest.approx(0.25)
    assert loss.item() == pytest.approx(plain.item() + 2.0 * 0.25)
    assert m["loss/preference"] == pytest.approx(plain.item())  # logged without the NLL
    mean = torch.zeros(1, 2, requires_grad=True)
    quasi_dpo_loss(
        mean, torch.zeros(1, 2), t(1.0, 1.0), t(-1.0, 0.0), sigma=1.0, beta=1.0, rpo_alpha=1.0
    )[0].backward()
    # DPO part -0.5 * (2, 1) as above; NLL part d/df ||w - f||^2 / 4 = -(w - f) / 2 = (-0.5, -0.5)
    assert torch.allclose(mean.grad, torch.tensor([[-1.5, -1.0]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        quasi_dpo_loss(**PAIR, sigma=1.0, beta=1.0, loss_type="kto")
    with pytest.raises(ValueError, match="sigma and beta"):
        quasi_dpo_loss(**PAIR, sigma=0.0, beta=1.0)
    with pytest.raises(ValueError, match="rpo_alpha"):
        quasi_dpo_loss(**PAIR, sigma=1.0, beta=1.0, rpo_alpha=-1.0)


def test_reward_gradient_loss_is_minus_mean_reward():
    loss, m = reward_gradient_loss(torch.tensor([1.0, 3.0]))
    assert loss.item() == -2.0 and m["loss/reward_gradient"] == -2.0


def test_gaussianity_penalty_by_hand():
    # values (1, -1, 1, -1) as a 1x1x2x2 image [[1, -1], [1, -1]]: m1 0, m2 1, m3 0, m4 1
    # rho_h = mean(1*-1, 1*-1) = -1, rho_v = mean(1*1, -1*-1) = 1
    x = torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]])
    penalty, m = gaussianity_penalty(x)
    assert penalty.item() == pytest.approx((1 - 3) ** 2 / 96 + 1 + 1)
    assert m["autocorr_h"] == -1.0 and m["autocorr_v"] == 1.0
    flat, _ = gaussianity_penalty(torch.tensor([[2.0, 2.0]]))  # m1 2, m2 4, m3 8, m4 16
    assert flat.item() == pytest.approx(4 + 9 / 2 + 64 / 15 + 169 / 96)


def test_gaussianity_penalty_is_small_for_white_noise_and_large_for_smooth_noise():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(4, 4, 32, 32, generator=g)
    smooth = torch.nn.functional.interpolate(white[:, :, :8, :8], size=(32, 32), mode="bilinear")
    smooth = smooth / smooth.std()
    n = white[0].numel()
    assert gaussianity_penalty(white)[0].item() * n < 20
    assert gaussianity_penalty(smooth)[0].item() > 0.5
