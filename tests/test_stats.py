"""fedprog.survival.stats against sksurv and scipy on known inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import bootstrap, wilcoxon
from sksurv.metrics import concordance_index_censored

from fedprog.survival.stats import (
    OVERALL,
    StatsError,
    bootstrap_summary,
    cindex,
    pair_matrices,
    paired_comparison,
    weighted_cindex,
)


def _sksurv(time, censorship, risk) -> float:
    return concordance_index_censored(np.asarray(censorship) == 0, np.asarray(time, float), np.asarray(risk))[
        0
    ]


def _data(n: int, seed: int, signal: float = 1.0):
    rng = np.random.default_rng(seed)
    risk = rng.standard_normal(n)
    time = np.round(rng.exponential(np.exp(-signal * risk)) * 10, 0) + 1  # rounded: tied times
    censorship = (rng.random(n) < 0.4).astype(int)
    return time, censorship, np.round(risk, 1)  # rounded: tied risks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cindex_matches_sksurv_with_tied_times_and_risks(seed):
    time, censorship, risk = _data(60, seed)
    assert cindex(time, censorship, risk) == pytest.approx(_sksurv(time, censorship, risk), abs=1e-12)


def test_weighted_cindex_equals_sksurv_on_the_duplicated_sample():
    time, censorship, risk = _data(40, 3)
    weights = np.random.default_rng(0).multinomial(40, np.full(40, 1 / 40))
    rows = np.repeat(np.arange(40), weights)
    expected = _sksurv(time[rows], censorship[rows], risk[rows])
    concordant, comparable = pair_matrices(time, censorship, risk)
    assert weighted_cindex(concordant, comparable, weights[None, :])[0] == pytest.approx(expected, abs=1e-12)


def _predictions(risks: dict[tuple[str, int], np.ndarray], outcome: dict[str, tuple]) -> pd.DataFrame:
    frames = []
    for (target, seed), risk in risks.items():
        time, censorship, sites = outcome[target]
        frames.append(
            pd.DataFrame(
                {
                    "target": target,
                    "seed": seed,
                    "site": sites,
                    "case_id": [f"{target}-{i:03d}" for i in range(len(time))],
                    "time": time,
                    "censorship": censorship,
                    "risk": risk,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def test_single_seed_single_site_ci_matches_scipy_bootstrap():
    time, censorship, risk = _data(120, 4)
    frame = _predictions({("t", 0): risk}, {"t": (time, censorship, np.zeros(120, int))})
    ours = bootstrap_summary(frame, n_boot=2000, seed=1).set_index("target").loc["t"]
    reference = bootstrap(
        (time, censorship, risk),
        _sksurv,
        paired=True,
        vectorized=False,
        n_resamples=2000,
        method="percentile",
        random_state=2,
    ).confidence_interval
    assert ours["c_index"] == pytest.approx(_sksurv(time, censorship, risk), abs=1e-12)
    assert ours["ci_low"] == pytest.approx(reference.low, abs=0.015)
    assert ours["ci_high"] == pytest.approx(reference.high, abs=0.015)


def test_seed_resampling_widens_the_interval_and_overall_averages_targets():
    outcome, risks = {}, {}
    for k, target in enumerate(["a", "b"]):
        time, censorship, truth = _data(80, 10 + k)
        outcome[target] = (time, censorship, np.arange(80) % 2)
        noise = np.random.default_rng(k)
        for seed in range(5):  # seeds differ a lot: the seed level must show in the CI
            risks[(target, seed)] = truth + noise.normal(0, 0.2 + seed, 80)
    frame = _predictions(risks, outcome)
    summary = bootstrap_summary(frame, n_boot=500).set_index("target")
    per_seed = {t: [cindex(*outcome[t][:2], risks[(t, s)]) for s in range(5)] for t in ["a", "b"]}
    assert summary.loc["a", "c_index"] == pytest.approx(np.mean(per_seed["a"]))
    assert summary.loc[OVERALL, "c_index"] == pytest.approx(np.mean([np.mean(v) for v in per_seed.values()]))
    one_seed = bootstrap_summary(frame[frame["seed"] == 0], n_boot=500).set_index("target")
    width = summary["ci_high"] - summary["ci_low"]
    assert (
        width["a"] > 0
        and summary.loc["a", "ci_low"] < summary.loc["a", "c_index"] < summary.loc["a", "ci_high"]
    )
    assert summary.loc["a", "n_seeds"] == 5 and one_seed.loc["a", "n_seeds"] == 1
    assert summary.loc[OVERALL, "n"] == 160


def test_paired_comparison_difference_ci_and_wilcoxon():
    outcome, better, worse = {}, {}, {}
    for k, target in enumerate(["a", "b", "c"]):
        time, censorship, truth = _data(100, 20 + k, signal=1.5)
        outcome[target] = (time, censorship, np.arange(100) % 2)
        rng = np.random.default_rng(k)
        for seed in range(4):
            better[(target, seed)] = truth + rng.normal(0, 0.3, 100)
            worse[(target, seed)] = truth + rng.normal(0, 2.0, 100)
    a, b = _predictions(better, outcome), _predictions(worse, outcome)
    table = paired_comparison(a, b, n_boot=400).set_index("target")
    diffs = [
        cindex(*outcome[t][:2], better[(t, s)]) - cindex(*outcome[t][:2], worse[(t, s)])
        for t in ["a", "b", "c"]
        for s in range(4)
    ]
    assert table.loc[OVERALL, "difference"] == pytest.approx(np.mean(diffs))
    assert table.loc[OVERALL, "wilcoxon_p"] == pytest.approx(wilcoxon(diffs).pvalue)
    assert table.loc[OVERALL, "n_pairs"] == 12
    assert table.loc[OVERALL, "ci_low"] > 0  # a clear improvement: the paired CI excludes 0
    same = paired_comparison(a, a, n_boot=50).set_index("target")
    assert same.loc[OVERALL, ["difference", "ci_low", "ci_high"]].tolist() == [0.0, 0.0, 0.0]
    assert same.loc[OVERALL, "wilcoxon_p"] == 1.0


def test_unpaired_inputs_are_refused_with_the_reason():
    time, censorship, risk = _data(30, 0)
    frame = _predictions({("t", 0): risk, ("t", 1): risk}, {"t": (time, censorship, np.zeros(30, int))})
    with pytest.raises(StatsError, match=r"target t: the settings differ in seeds \[0, 1\] vs \[0\]"):
        paired_comparison(frame, frame[frame["seed"] == 0])
    with pytest.raises(StatsError, match="missing column"):
        bootstrap_summary(frame.drop(columns=["risk"]))
    with pytest.raises(StatsError, match="appears twice"):
        bootstrap_summary(pd.concat([frame, frame.iloc[:1]]))
