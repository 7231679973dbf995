"""Tests of fedprog.survival.metrics: values against hand counts and sksurv, NaN policy, checks, KM plot."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from fedprog.survival.metrics import (
    MetricUndefinedError,
    NoComparablePairsError,
    SurvivalInputError,
    check_risk,
    check_survival,
    check_survival_curves,
    evaluate_predictions,
    evaluation_times,
    event_weighted_mean,
    harrell_cindex,
    integrated_brier,
    logrank_split,
    time_auc,
    uno_cindex,
    uno_truncation_time,
)

SHAPE, SCALE = 1.5, 30.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def weibull_cohort(
    n: int, seed: int, beta: float = 1.0, censor_max: float = 80.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weibull proportional-hazards cohort: (time, censorship, true linear predictor)."""
    rng = np.random.default_rng(seed)
    lp = beta * rng.normal(size=n)
    event_time = SCALE * (-np.log(rng.uniform(size=n)) / np.exp(lp)) ** (1 / SHAPE)
    censor_time = rng.uniform(0, censor_max, size=n)
    return np.minimum(event_time, censor_time), (censor_time < event_time).astype(float), lp


def true_curves(lp: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """True survival past the end of each bin, shape (n, n_bins)."""
    return np.exp(-((edges[None, 1:] / SCALE) ** SHAPE) * np.exp(lp)[:, None])


@pytest.fixture(scope="module")
def cohorts() -> dict[str, np.ndarray]:
    train_time, train_cens, _ = weibull_cohort(300, seed=1)
    time, cens, lp = weibull_cohort(200, seed=2)
    inner = np.quantile(train_time[train_cens == 0], [0.25, 0.5, 0.75])
    edges = np.r_[0.0, inner, train_time.max()]
    perm = np.random.default_rng(3).permutation(lp.size)
    return {
        "train_time": train_time,
        "train_cens": train_cens,
        "time": time,
        "cens": cens,
        "lp": lp,
        "edges": edges,
        "survival": true_curves(lp, edges),
        "perm": perm,
    }


# --------------------------------------------------------------------------------------------- checks


def test_check_survival_converts_censorship_to_event() -> None:
    event, time = check_survival(np.array([3, 5, 7]), [1.0, 0.0, 1.0])
    assert event.dtype == bool and event.tolist() == [False, True, False]
    assert time.dtype == np.float64 and time.tolist() == [3.0, 5.0, 7.0]


@pytest.mark.parametrize(
    ("time", "censorship", "match"),
    [
        ([1.0, 2.0], [0, 2], r"censorship: expected values in \{0, 1\}.*found 2.0 at index 1"),
        ([1.0, -2.0], [0, 1], r"time: survival times must be >= 0, found -2.0 at index 1"),
        ([1.0, math.nan], [0, 1], r"time: 1 non-finite value\(s\).*index 1"),
        ([1.0, 2.0, 3.0], [0, 1], r"time and censorship differ in length: 3 vs 2"),
        ([[1.0, 2.0]], [[0, 1]], r"time: expected a 1-D array"),
        (["a", "b"], [0, 1], r"time: expected numeric values"),
        ([], [], r"time: no samples"),
    ],
)
def test_check_survival_errors_name_the_argument(time: list, censorship: list, match: str) -> None:
    with pytest.raises(SurvivalInputError, match=match):
        check_survival(time, censorship)


def test_check_survival_uses_given_names() -> None:
    with pytest.raises(SurvivalInputError, match="train_censorship: expected values"):
        check_survival([1.0], [0.5], names=("train_time", "train_censorship"))


def test_check_risk_and_curves_errors() -> None:
    with pytest.raises(SurvivalInputError, match=r"risk: expected 3 scores.*got 2"):
        check_risk([0.1, 0.2], 3)
    with pytest.raises(SurvivalInputError, match=r"risk: 1 non-finite value\(s\), first nan at index 0"):
        check_risk([math.nan, 0.2], 2)
    with pytest.raises(
        SurvivalInputError, match=r"survival: probabilities must lie in \[0, 1\].*patient 1, bin 0"
    ):
        check_survival_curves([[0.9, 0.5], [1.5, 0.2]], [0, 1, 2], 2)
    with pytest.raises(SurvivalInputError, match=r"bin_edges: expected 3 edges for 2 bins"):
        check_survival_curves([[0.9, 0.5]], [0, 1], 1)
    with pytest.raises(SurvivalInputError, match=r"bin_edges: must be strictly increasing"):
        check_survival_curves([[0.9, 0.5]], [0, 2, 1], 1)
    with pytest.raises(SurvivalInputError, match=r"survival: expected shape \(2, n_bins >= 1\)"):
        check_survival_curves([0.9, 0.5], [0, 1, 2], 2)


# --------------------------------------------------------------------------------------------- C-index


@pytest.mark.parametrize(
    ("risk", "expected"),
    [
        ([5, 4, 3, 2, 1], 1.0),  # every comparable pair ordered right
        ([1, 2, 3, 4, 5], 0.0),  # every pair reversed
        ([5, 3, 1, 2, 4], 4 / 7),  # event 0: 4 concordant; event 2: 0 of 2; event 3: 0 of 1
        ([5, 3, 1, 2, 2], 4.5 / 7),  # the event-3 pair is a risk tie: counts 1/2
    ],
)
def test_harrell_cindex_hand_computed(risk: list[float], expected: float) -> None:
    # events at t = 1, 3, 4; censored at t = 2, 5 -> comparable pairs: 4 + 2 + 1 = 7
    time = [1.0, 2.0, 3.0, 4.0, 5.0]
    censorship = [0, 1, 0, 0, 1]
    assert harrell_cindex(time, censorship, risk) == pytest.approx(expected)


def test_harrell_cindex_matches_sksurv(cohorts: dict[str, np.ndarray]) -> None:
    risk = cohorts["lp"] + np.random.default_rng(4).normal(size=cohorts["lp"].size)
    ours = harrell_cindex(cohorts["time"], cohorts["cens"], risk)
    theirs = concordance_index_censored(cohorts["cens"] == 0, cohorts["time"], risk)[0]
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert 0.55 < ours < 0.75


def test_harrell_cindex_all_censored_raises() -> None:
    with pytest.raises(NoComparablePairsError, match="all 3 patients are censored"):
        harrell_cindex([1.0, 2.0, 3.0], [1, 1, 1], [0.1, 0.2, 0.3])


def test_harrell_cindex_no_comparable_pair_raises() -> None:
    # the only event is the last time: nobody is known to outlive it
    with pytest.raises(NoComparablePairsError, match="no comparable pairs among 3 patients"):
        harrell_cindex([1.0, 2.0, 3.0], [1, 1, 0], [0.1, 0.2, 0.3])


def test_uno_cindex_perfect_beats_random(cohorts: dict[str, np.ndarray]) -> None:
    args = (cohorts["train_time"], cohorts["train_cens"])
    perfect = uno_cindex(cohorts["time"], cohorts["cens"], cohorts["lp"], *args)
    random = uno_cindex(cohorts["time"], cohorts["cens"], cohorts["lp"][cohorts["perm"]], *args)
    assert perfect > 0.68
    assert abs(random - 0.5) < 0.08
    assert perfect - random > 0.15


def test_uno_cindex_handles_test_times_beyond_training_follow_up(cohorts: dict[str, np.ndarray]) -> None:
    # a training cohort with shorter follow-up: sksurv alone would refuse the later test events
    short = cohorts["train_time"] < 30
    value = uno_cindex(
        cohorts["time"],
        cohorts["cens"],
        cohorts["lp"],
        cohorts["train_time"][short],
        cohorts["train_cens"][short],
    )
    assert 0.6 < value < 0.9
    smaller_tau = uno_cindex(
        cohorts["time"],
        cohorts["cens"],
        cohorts["lp"],
        cohorts["train_time"],
        cohorts["train_cens"],
        tau=20.0,
    )
    assert 0.6 < smaller_tau < 0.9


def test_uno_cindex_all_censored_training_is_undefined(cohorts: dict[str, np.ndarray]) -> None:
    with pytest.raises(
        MetricUndefinedError, match="train_censorship: all 300 training patients are censored"
    ):
        uno_cindex(
            cohorts["time"],
            cohorts["cens"],
            cohorts["lp"],
            cohorts["train_time"],
            np.ones_like(cohorts["train_cens"]),
        )


def test_uno_long_follow_up_matches_sksurv_at_the_data_chosen_tau() -> None:
    from sksurv.metrics import concordance_index_ipcw
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    def long_follow_up(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # exponential survival (scale 200 months) with censoring spread over 400 months: G falls to ~0
        rng = np.random.default_rng(seed)
        lp = rng.normal(size=n)
        event_time = 200.0 * -np.log(rng.uniform(size=n)) / np.exp(lp)
        censor_time = rng.uniform(0, 400.0, size=n)
        return np.minimum(event_time, censor_time), (censor_time < event_time).astype(float), lp

    train_time, train_cens, _ = long_follow_up(400, seed=11)
    time, cens, lp = long_follow_up(300, seed=12)
    value, tau = uno_cindex(time, cens, lp, train_time, train_cens, return_tau=True)
    assert tau == uno_truncation_time(train_time, train_cens) < train_time.max()
    grid, g = kaplan_meier_estimator(train_cens == 1, train_time)
    assert np.r_[1.0, g][np.searchsorted(grid, tau)] >= 0.2  # G just before tau
    train = Surv.from_arrays(train_cens == 0, train_time)
    test = Surv.from_arrays(cens == 0, time)
    reference = concordance_index_ipcw(train, test, lp, tau=tau)[0]
    assert value == pytest.approx(reference, abs=1e-12)
    assert value == pytest.approx(harrell_cindex(time, cens, lp), abs=0.08)  # same ballpark as Harrell


def test_uno_unstable_weights_give_nan_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    # training censoring removes almost everyone before month 100: G(99) is tiny, so one late test event
    # outweighs ten early ones
    train_time = np.r_[np.linspace(1.0, 99.0, 60), [100.0, 101.0, 102.0]]
    train_cens = np.r_[np.ones(60), np.zeros(3)]
    time = np.r_[np.linspace(1.0, 5.0, 10), [98.0, 100.0, 101.0]]
    cens = np.r_[np.zeros(11), np.ones(2)]
    risk = -time
    with pytest.raises(MetricUndefinedError, match=r"unstable: IPCW weights leave .* effective of 11 test"):
        uno_cindex(time, cens, risk, train_time, train_cens, tau=101.0)
    with caplog.at_level(logging.INFO):
        value, tau = uno_cindex(time, cens, risk, train_time, train_cens, return_tau=True)
    assert tau < 98.0 and value == pytest.approx(1.0)  # the data-chosen tau leaves out the late event
    assert "chosen from the data" in caplog.text


# --------------------------------------------------------------------------------------------- time-dependent


def test_evaluation_times_inside_common_follow_up(cohorts: dict[str, np.ndarray]) -> None:
    grid = evaluation_times(cohorts["time"], cohorts["train_time"][cohorts["train_time"] < 40])
    assert grid.size >= 2 and np.all(np.diff(grid) > 0)
    assert grid.min() >= max(cohorts["time"].min(), cohorts["train_time"].min())
    assert grid.max() < 40


def test_evaluation_times_too_few_is_undefined() -> None:
    with pytest.raises(MetricUndefinedError, match="fewer than 2 evaluation times"):
        evaluation_times(np.array([10.0, 11.0, 12.0]), np.array([1.0, 2.0]))


def test_integrated_brier_perfect_beats_random(cohorts: dict[str, np.ndarray]) -> None:
    args = (cohorts["edges"], cohorts["train_time"], cohorts["train_cens"])
    perfect = integrated_brier(cohorts["time"], cohorts["cens"], cohorts["survival"], *args)
    random = integrated_brier(cohorts["time"], cohorts["cens"], cohorts["survival"][cohorts["perm"]], *args)
    constant = integrated_brier(
        cohorts["time"], cohorts["cens"], np.full_like(cohorts["survival"], 0.5), *args
    )
    assert 0 < perfect < random
    assert random - perfect > 0.03
    assert constant == pytest.approx(0.25, abs=0.01)  # (0.5)^2 whatever the outcome, up to IPCW noise


def test_integrated_brier_explicit_times_outside_range_raise(cohorts: dict[str, np.ndarray]) -> None:
    with pytest.raises(SurvivalInputError, match=r"times: must lie inside the common follow-up"):
        integrated_brier(
            cohorts["time"],
            cohorts["cens"],
            cohorts["survival"],
            cohorts["edges"],
            cohorts["train_time"],
            cohorts["train_cens"],
            times=[1.0, 1e4],
        )
    with pytest.raises(SurvivalInputError, match=r"times: the IBS integrates over at least 2 times"):
        integrated_brier(
            cohorts["time"],
            cohorts["cens"],
            cohorts["survival"],
            cohorts["edges"],
            cohorts["train_time"],
            cohorts["train_cens"],
            times=[10.0],
        )


def test_time_auc_perfect_beats_random_and_risk_fallback(cohorts: dict[str, np.ndarray]) -> None:
    args = (cohorts["train_time"], cohorts["train_cens"])
    times, auc, perfect = time_auc(
        cohorts["time"], cohorts["cens"], cohorts["survival"], cohorts["edges"], *args
    )
    assert times.shape == auc.shape and np.all(np.isfinite(auc))
    _, _, random = time_auc(
        cohorts["time"], cohorts["cens"], cohorts["survival"][cohorts["perm"]], cohorts["edges"], *args
    )
    _, _, from_risk = time_auc(cohorts["time"], cohorts["cens"], None, None, *args, risk=cohorts["lp"])
    assert perfect > 0.65 and from_risk > 0.65
    assert abs(random - 0.5) < 0.1
    with pytest.raises(SurvivalInputError, match="give either survival"):
        time_auc(cohorts["time"], cohorts["cens"], None, None, *args)


# ------------------------------------------------------------------------------------------------ log-rank


def test_logrank_small_for_separated_groups_large_for_identical() -> None:
    time, cens, lp = weibull_cohort(200, seed=7, beta=1.5)
    _, p_separated = logrank_split(time, cens, lp)
    noise = np.random.default_rng(8).normal(size=lp.size)
    _, p_identical = logrank_split(time, cens, noise)
    assert p_separated < 1e-6
    assert p_identical > 0.05


def test_logrank_constant_risk_is_undefined() -> None:
    with pytest.raises(MetricUndefinedError, match="one group empty"):
        logrank_split([1.0, 2.0, 3.0], [0, 0, 1], [0.5, 0.5, 0.5])


# ------------------------------------------------------------------------------------ evaluate, summaries


def test_evaluate_predictions_all_metrics(cohorts: dict[str, np.ndarray]) -> None:
    metrics = evaluate_predictions(
        cohorts["time"],
        cohorts["cens"],
        cohorts["lp"],
        cohorts["survival"],
        cohorts["edges"],
        cohorts["train_time"],
        cohorts["train_cens"],
    )
    assert set(metrics) == {
        "c_index",
        "c_index_ipcw",
        "c_index_ipcw_tau",
        "ibs",
        "mean_auc",
        "logrank_p",
        "n",
        "n_events",
    }
    assert 0 < metrics["c_index_ipcw_tau"] <= cohorts["train_time"].max()
    assert metrics["n"] == 200 and metrics["n_events"] == int((cohorts["cens"] == 0).sum())
    assert metrics["c_index"] == pytest.approx(
        harrell_cindex(cohorts["time"], cohorts["cens"], cohorts["lp"])
    )
    for key in ("c_index", "c_index_ipcw", "ibs", "mean_auc", "logrank_p"):
        assert math.isfinite(metrics[key]), key


def test_evaluate_predictions_all_censored_is_nan_with_warning(
    cohorts: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedprog.survival.metrics"):
        metrics = evaluate_predictions(
            cohorts["time"],
            np.ones_like(cohorts["cens"]),
            cohorts["lp"],
            cohorts["survival"],
            cohorts["edges"],
            cohorts["train_time"],
            cohorts["train_cens"],
        )
    for key in ("c_index", "c_index_ipcw", "ibs", "mean_auc", "logrank_p"):
        assert math.isnan(metrics[key]), key  # NaN, never 0.0
    assert metrics["n_events"] == 0
    assert "c_index is NaN: harrell_cindex: all 200 patients are censored" in caplog.text


def test_evaluate_predictions_without_curves_or_training(
    cohorts: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedprog.survival.metrics"):
        metrics = evaluate_predictions(cohorts["time"], cohorts["cens"], cohorts["lp"])
    assert math.isnan(metrics["ibs"])
    assert "ibs is NaN: no predicted survival curves" in caplog.text
    assert math.isfinite(metrics["c_index_ipcw"]) and math.isfinite(metrics["mean_auc"])


def test_evaluate_predictions_invalid_input_raises(cohorts: dict[str, np.ndarray]) -> None:
    with pytest.raises(SurvivalInputError, match="train_time and train_censorship must be given together"):
        evaluate_predictions(
            cohorts["time"], cohorts["cens"], cohorts["lp"], train_time=cohorts["train_time"]
        )
    with pytest.raises(SurvivalInputError, match="bin_edges: required together with survival"):
        evaluate_predictions(cohorts["time"], cohorts["cens"], cohorts["lp"], survival=cohorts["survival"])


def test_event_weighted_mean() -> None:
    assert event_weighted_mean([0.6, 0.8], [30, 10]) == pytest.approx(0.65)
    assert event_weighted_mean([0.6, math.nan, 0.9], [10, 50, 0]) == pytest.approx(0.6)
    assert math.isnan(event_weighted_mean([math.nan], [5]))
    with pytest.raises(SurvivalInputError, match="n_events: must be >= 0"):
        event_weighted_mean([0.5], [-1])


# --------------------------------------------------------------------------------------------- plot


def test_plot_km_writes_png(tmp_path, cohorts: dict[str, np.ndarray]) -> None:
    from fedprog.report import plot_km

    out = plot_km(
        cohorts["time"], cohorts["cens"], cohorts["lp"], tmp_path / "km" / "brca.png", "BRCA -> BLCA"
    )
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_km_all_censored_still_plots_with_warning(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from fedprog.report import plot_km  # plots live in the report module; the metrics stay pure

    time, cens, lp = weibull_cohort(30, seed=9)
    with caplog.at_level(logging.WARNING, logger="fedprog.report"):
        out = plot_km(time, np.ones_like(cens), lp, tmp_path / "km.png", "no events")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "log-rank p-value unavailable" in caplog.text
