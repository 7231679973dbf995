"""Tests for fedprog.survival.losses: hand-computed NLL/Cox values, conversions, input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedprog.survival.losses import (
    SurvivalInputError,
    cox_ph_loss,
    nll_survival_loss,
    risk_from_logits,
    survival_from_logits,
)

LOG2 = math.log(2.0)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_survival_from_logits_is_cumulative_product_of_one_minus_hazard():
    logits = torch.tensor([[_logit(0.2), _logit(0.5), _logit(0.75)]])
    expected = torch.tensor([[0.8, 0.4, 0.1]])
    torch.testing.assert_close(survival_from_logits(logits), expected)


def test_risk_from_logits_is_minus_sum_of_survival():
    logits = torch.tensor([[_logit(0.2), _logit(0.5)], [0.0, 0.0]])
    torch.testing.assert_close(risk_from_logits(logits), torch.tensor([-(0.8 + 0.4), -(0.5 + 0.25)]))


def test_single_output_is_the_log_risk():
    outputs = torch.tensor([[0.3], [-1.2]])
    torch.testing.assert_close(risk_from_logits(outputs), torch.tensor([0.3, -1.2]))
    with pytest.raises(SurvivalInputError, match="log-risk and has no survival curve"):
        survival_from_logits(outputs)


def test_higher_hazard_gives_higher_risk():
    low, high = torch.full((1, 4), -2.0), torch.full((1, 4), 2.0)
    assert risk_from_logits(high) > risk_from_logits(low)


@pytest.mark.parametrize(
    ("bins", "censorship", "expected"),
    [
        # h = (0.5, 0.5): event in bin 1: -(log S_0 + log h_1) = 2 log 2 for any alpha
        ([1], [0.0], 2 * LOG2),
        # event in bin 0: -(log S_-1 + log h_0) = log 2
        ([0], [0.0], LOG2),
        # censored in bin 0: (1 - alpha) * -log S_0 = 0.5 log 2
        ([0], [1.0], 0.5 * LOG2),
        # censored in bin 1: 0.5 * -log S_1 = 0.5 * 2 log 2
        ([1], [1.0], LOG2),
        # batch mean of the first and third cases
        ([1, 0], [0.0, 1.0], (2 * LOG2 + 0.5 * LOG2) / 2),
    ],
)
def test_nll_matches_hand_computed_values(bins, censorship, expected):
    logits = torch.zeros(len(bins), 2)
    loss = nll_survival_loss(logits, torch.tensor(bins), torch.tensor(censorship), alpha=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_nll_unequal_hazards_and_alpha_zero():
    logits = torch.tensor([[_logit(0.2), _logit(0.5)]] * 2)
    bins, censorship = torch.tensor([1, 1]), torch.tensor([0.0, 1.0])
    event_term = -(math.log(0.8) + math.log(0.5))
    censored_term = -math.log(0.4)
    loss = nll_survival_loss(logits, bins, censorship, alpha=0.0)
    assert loss.item() == pytest.approx((event_term + censored_term) / 2, rel=1e-6)
    loss = nll_survival_loss(logits, bins, censorship, alpha=1.0)
    assert loss.item() == pytest.approx(event_term / 2, rel=1e-6)


def test_nll_clamps_probabilities_at_eps():
    logits = torch.tensor([[-100.0, 0.0]])  # h_0 ~ 0
    loss = nll_survival_loss(logits, torch.tensor([0]), torch.tensor([0.0]), eps=1e-7)
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-5)


def test_nll_gradient_is_finite_and_pushes_hazard_up_for_events():
    logits = torch.zeros(1, 4, requires_grad=True)
    nll_survival_loss(logits, torch.tensor([2]), torch.tensor([0.0])).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 2] < 0  # raising h_2 lowers the loss
    assert (logits.grad[0, :2] > 0).all()  # surviving bins 0 and 1 wants lower hazards there


@pytest.mark.parametrize(
    ("bins", "censorship", "match"),
    [
        ([4], [0.0], r"bins must lie in \[0, 4\)"),
        ([-1], [0.0], "bins must lie"),
        ([0], [0.5], "censorship must contain only 0 and 1"),
        ([0, 1], [0.0, 1.0], "logits has 1 samples but bins has 2"),
    ],
)
def test_nll_rejects_bad_inputs(bins, censorship, match):
    with pytest.raises(SurvivalInputError, match=match):
        nll_survival_loss(torch.zeros(1, 4), torch.tensor(bins), torch.tensor(censorship))


def test_cox_matches_hand_computed_breslow_value():
    risk = torch.tensor([0.5, -0.2, 1.0])
    time = torch.tensor([1.0, 2.0, 3.0])
    event = torch.tensor([1.0, 0.0, 1.0])
    first = 0.5 - math.log(math.exp(0.5) + math.exp(-0.2) + math.exp(1.0))
    last = 1.0 - math.log(math.exp(1.0))
    assert cox_ph_loss(risk, time, event).item() == pytest.approx(-(first + last) / 2, rel=1e-6)


def test_cox_breslow_ties_share_the_full_risk_set():
    risk = torch.tensor([0.3, -0.4, 0.9])
    time = torch.tensor([1.0, 1.0, 2.0])
    event = torch.tensor([1.0, 1.0, 0.0])
    lse = math.log(sum(math.exp(r) for r in (0.3, -0.4, 0.9)))
    expected = -((0.3 - lse) + (-0.4 - lse)) / 2
    assert cox_ph_loss(risk, time, event).item() == pytest.approx(expected, rel=1e-6)
    # (n, 1) outputs are accepted as well
    assert cox_ph_loss(risk[:, None], time, event).item() == pytest.approx(expected, rel=1e-6)


def test_cox_gradient_vanishes_at_the_sksurv_breslow_estimate():
    sksurv_linear = pytest.importorskip("sksurv.linear_model")
    from sksurv.util import Surv

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 2))
    time = np.round(rng.exponential(scale=np.exp(-x @ np.array([0.8, -0.5]))), 1) + 0.1  # rounding -> ties
    event = rng.random(60) < 0.7
    fitted = sksurv_linear.CoxPHSurvivalAnalysis(ties="breslow", alpha=0.0, tol=1e-12, n_iter=200)
    fitted.fit(x, Surv.from_arrays(event, time))
    beta = torch.tensor(fitted.coef_, dtype=torch.float64, requires_grad=True)
    features = torch.tensor(x, dtype=torch.float64)
    loss = cox_ph_loss(features @ beta, torch.tensor(time), torch.tensor(event, dtype=torch.float64))
    loss.backward()
    assert beta.grad.abs().max().item() < 1e-6


def test_cox_without_events_warns_and_returns_zero_with_a_graph():
    risk = torch.tensor([0.1, 0.2], requires_grad=True)
    with pytest.warns(UserWarning, match="no event in the batch"):
        loss = cox_ph_loss(risk, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(risk.grad, torch.zeros(2))


@pytest.mark.parametrize(
    ("risk", "time", "event", "match"),
    [
        (torch.zeros(2, 2), torch.ones(2), torch.ones(2), r"risk must have shape \(n_samples,\)"),
        (torch.zeros(3), torch.ones(2), torch.ones(3), "risk has 3 samples but time has 2"),
        (torch.zeros(2), torch.ones(2), torch.tensor([1.0, 2.0]), "event must contain only 0 and 1"),
    ],
)
def test_cox_rejects_bad_inputs(risk, time, event, match):
    with pytest.raises(SurvivalInputError, match=match):
        cox_ph_loss(risk, time, event)
