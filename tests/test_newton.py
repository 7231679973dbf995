"""Federated Newton's method (strategy=newton): the Cox terms against autograd, the summed steps against an
independent fit of the pooled stratified ridge Cox, the reply screening and the settings it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from fedprog.config import load_config
from fedprog.federated.messages import ReplyError
from fedprog.federated.newton import (
    GRAD_PREFIX,
    HESSIAN,
    NewtonSettingsError,
    SiteTerms,
    check_reply,
    check_settings,
    newton_step,
)
from fedprog.survival.cox_terms import cox_terms
from fedprog.survival.losses import cox_ph_loss


def _stratum(seed: int, n: int, p: int, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cases of one site: features, times with ties (rounded), events; the baseline hazard differs by site."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    beta = np.linspace(-1.0, 1.0, p)
    time = np.round(rng.exponential(np.exp(-(x @ beta) + shift)) * 4) / 4 + 0.25
    event = (rng.random(n) < 0.7).astype(float)
    return x, time, event


def test_cox_terms_equal_autograd_of_the_partial_likelihood_with_ties():
    x, time, event = _stratum(0, 15, 1, 0.0)
    risk = torch.tensor(x[:, 0] * 0.7, dtype=torch.float64)
    t, e = torch.tensor(time), torch.tensor(event)
    assert len(np.unique(time)) < len(time)  # ties are exercised

    def summed(r: torch.Tensor) -> torch.Tensor:
        return cox_ph_loss(r, t, e) * e.sum()

    terms = cox_terms(risk, t, e)
    assert float(terms.value) == pytest.approx(float(summed(risk)), rel=1e-12)
    grad = torch.autograd.functional.jacobian(summed, risk)
    assert torch.allclose(terms.grad, grad, atol=1e-12)
    hessian = torch.autograd.functional.hessian(summed, risk)
    assert torch.allclose(terms.hessian(torch.eye(len(risk), dtype=torch.float64)), hessian, atol=1e-12)


def test_cox_terms_without_events_are_zero():
    terms = cox_terms(torch.zeros(4, dtype=torch.float64), torch.arange(4.0), torch.zeros(4))
    assert terms.n_events == 0 and float(terms.value) == 0.0
    assert torch.count_nonzero(terms.grad) == 0


def _site_reply(x: np.ndarray, time: np.ndarray, event: np.ndarray, w: np.ndarray, b: float):
    """What a site sends for a linear model risk = x @ w + b (Jacobian [x, 1])."""
    jacobian = torch.tensor(np.hstack([x, np.ones((len(x), 1))]))
    terms = cox_terms(jacobian @ torch.tensor(np.append(w, b)), torch.tensor(time), torch.tensor(event))
    site = SiteTerms(
        names=("linear.weight", "linear.bias"),
        shapes=((1, x.shape[1]), (1,)),
        value=float(terms.value),
        grad=(jacobian.T @ terms.grad).numpy(),
        hessian=terms.hessian(jacobian).numpy(),
        n_events=terms.n_events,
    )
    return site.arrays(), site.value, site.n_events


def pooled_stratified_ridge(sites, l2: float) -> np.ndarray:
    """Independent reference: BFGS on sum_sites cox_ph_loss * events / all events + l2/2 ||(w, b)||^2."""
    total = sum(float(e.sum()) for _, _, e in sites)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        param = torch.tensor(theta, requires_grad=True)
        loss = sum(
            cox_ph_loss(torch.tensor(x) @ param[:-1] + param[-1], torch.tensor(t), torch.tensor(e)) * e.sum()
            for x, t, e in sites
        )
        loss = loss / total + 0.5 * l2 * (param @ param)
        loss.backward()
        return float(loss.detach()), param.grad.numpy()

    p = sites[0][0].shape[1] + 1
    fitted = minimize(objective, np.zeros(p), jac=True, method="BFGS", options={"gtol": 1e-10})
    return fitted.x


def test_summed_newton_steps_reach_the_pooled_stratified_ridge_cox_quadratically():
    sites = [_stratum(seed, n, 4, shift) for seed, n, shift in ((1, 40, 0.0), (2, 25, 1.5), (3, 60, -1.0))]
    l2 = 0.05
    weights = {"linear.weight": np.zeros((1, 4)), "linear.bias": np.zeros(1)}
    norms = []
    for _ in range(6):
        w, b = weights["linear.weight"][0], weights["linear.bias"][0]
        replies = [_site_reply(x, t, e, w, b) for x, t, e in sites]
        step = newton_step(replies, weights, l2=l2, damping=0.0, max_step=10.0)
        weights, norms = step.weights, [*norms, step.gradient_norm]
    reference = pooled_stratified_ridge(sites, l2)
    fitted = np.append(weights["linear.weight"][0], weights["linear.bias"][0])
    np.testing.assert_allclose(fitted, reference, atol=1e-6)
    assert norms[3] < 1e-6 < norms[0] and norms[2] < norms[1] ** 1.5  # quadratic convergence
    # the strata matter: one pooled stratum (one baseline hazard for all sites) is another model
    pooled = [tuple(np.concatenate(parts) for parts in zip(*sites, strict=True))]
    assert np.abs(pooled_stratified_ridge(pooled, l2) - reference).max() > 1e-3


def test_a_long_step_is_shortened_to_max_step_and_unknown_weights_are_kept():
    x, t, e = _stratum(4, 30, 3, 0.0)
    current = {"linear.weight": np.zeros((1, 3), np.float32), "linear.bias": np.zeros(1, np.float32)}
    current["buffer"] = np.arange(3)
    step = newton_step([_site_reply(x, t, e, np.zeros(3), 0.0)], current, l2=1e-3, damping=0.0, max_step=0.1)
    moved = np.append(step.weights["linear.weight"], step.weights["linear.bias"])
    assert step.clipped and np.linalg.norm(moved) == pytest.approx(0.1, rel=1e-5)
    assert step.weights["linear.weight"].dtype == np.float32 and step.weights["buffer"] is current["buffer"]


def test_replies_that_are_not_newton_terms_are_rejected():
    x, t, e = _stratum(5, 20, 2, 0.0)
    arrays, _, _ = _site_reply(x, t, e, np.zeros(2), 0.0)
    reference = {"linear.weight": np.zeros((1, 2), np.float32), "linear.bias": np.zeros(1, np.float32)}
    assert check_reply(arrays, reference) > 0
    cases = {
        "no 'hessian'": {k: v for k, v in arrays.items() if k != HESSIAN},
        "do not match the model's": dict(reversed(list(arrays.items())[:2])) | {HESSIAN: arrays[HESSIAN]},
        "do not match the model": {**arrays, GRAD_PREFIX + "other": np.zeros(1)},
        "has shape": {**arrays, HESSIAN: np.eye(2)},
        "not symmetric": {**arrays, HESSIAN: arrays[HESSIAN] + np.triu(np.ones((3, 3)), 1)},
        "not finite": {**arrays, GRAD_PREFIX + "linear.bias": np.array([np.nan])},
    }
    for reason, bad in cases.items():
        with pytest.raises(ReplyError, match=reason):
            check_reply(bad, reference)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("model=survpath", "model.name"),
        ("training.loss=nll", "training.loss"),
        ("training.weight_decay=0", "training.weight_decay"),
        ("training.l1=0.01", "training.l1"),
        ("privacy=central_dp", "privacy.mode"),
        ("strategy.fraction_train=0.5", "strategy.fraction_train"),
        ("strategy.max_step=0", "strategy.max_step"),
    ],
)
def test_settings_newton_cannot_honour_are_refused_naming_the_key(override: str, names: str):
    base = ["strategy=newton", "model=linear_cox", "training.loss=cox", "training.batch_size=16"]
    check_settings(load_config("simulate", base))
    with pytest.raises(NewtonSettingsError, match=names):
        check_settings(load_config("simulate", [*base, override]))


def test_fedprog_simulate_refuses_newton_settings_in_one_line_before_start_up(tmp_path, capsys):
    from fedprog.federated import simulation

    cfg = load_config("simulate", ["strategy=newton", f"out={tmp_path / 'out'}"])  # SurvPath, NLL loss
    assert simulation.main(cfg) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "strategy=newton: model.name='survpath': needs model=linear_cox" in line
    assert not (tmp_path / "out").exists()


def test_a_newton_round_without_every_training_site_fails_naming_the_missing_one():
    import fed_helpers  # noqa: F401 - sets Flower's TaskIdentity so Messages can be built
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from fedprog.federated.errors import RunFailed
    from fedprog.federated.strategy import build_strategy, numpy_to_arrays

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    x, t, e = _stratum(6, 30, 2, 0.0)
    arrays, value, n_events = _site_reply(x, t, e, np.zeros(2), 0.0)
    current = {"linear.weight": np.zeros((1, 2), np.float32), "linear.bias": np.zeros(1, np.float32)}
    strategy = build_strategy({"name": "newton", "fraction_train": 1.0}, weight_decay=0.01)
    strategy.set_sites({1: "a", 2: "b"}, {1: "a", 2: "b"})
    sent = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(1, numpy_to_arrays(current), ConfigRecord(), Grid())
    }
    metrics = MetricRecord({"num-examples": 30, "n-events": n_events, "cox-value": value})

    def reply(node: int) -> Message:
        return Message(
            RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": metrics}), reply_to=sent[node]
        )

    with pytest.raises(RunFailed, match=r"needs every training site; missing \{'b': 'no reply'\}"):
        strategy.aggregate_train(1, [reply(1)])
    both = [reply(1), reply(2)]
    stepped, _ = strategy.aggregate_train(1, both)
    assert stepped is not None and strategy.last_info["gradient_norm"] > 0


def test_a_training_config_every_site_would_refuse_is_refused_before_start_up(tmp_path, capsys):
    from fedprog.federated import simulation

    cox_per_case = ["model=linear_cox", "training.loss=cox", "training.batch_size=1"]
    cox_per_case.append(f"out={tmp_path / 'out'}")
    for strategy in ("fedavg", "newton"):  # every site validates it before training and evaluating
        assert simulation.main(load_config("simulate", [*cox_per_case, f"strategy={strategy}"])) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "training.loss='cox' needs training.batch_size >= 2" in line
    assert not (tmp_path / "out").exists()
