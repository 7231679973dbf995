"""Federated fitting from aggregates, site resolution, KM aggregates, derived seeds."""

from __future__ import annotations

import numpy as np
import pytest

from fedprog.federated.federation import (
    FitError,
    SiteInfo,
    SiteResolutionError,
    assign_roles,
    bin_edges_from_histogram,
    derived_seed,
    event_histogram,
    histogram_quantiles,
    km_aggregates,
    pool_moments,
    resolve_site_name,
    time_grid,
)

RNG = np.random.default_rng(0)


def test_histogram_quantiles_match_exact_quantiles_within_a_bucket():
    times = RNG.weibull(1.2, size=2000) * 40
    cens = (RNG.random(2000) < 0.4).astype(float)
    grid = time_grid(400.0, 0.5)
    parts = [event_histogram(times[i::3], cens[i::3], grid) for i in range(3)]  # three sites
    pooled = np.sum(parts, axis=0)
    assert pooled.sum() == (cens == 0).sum()
    exact = np.quantile(times[cens == 0], [0.25, 0.5, 0.75])
    np.testing.assert_allclose(histogram_quantiles(pooled, grid, [0.25, 0.5, 0.75]), exact, atol=0.5)
    edges = bin_edges_from_histogram(pooled, grid, 4)
    assert edges[0] == 0.0 and edges[-1] == 400.0 and np.all(np.diff(edges) > 0)


def test_fit_errors():
    grid = time_grid(10.0, 1.0)
    with pytest.raises(FitError, match="no events"):
        bin_edges_from_histogram(np.zeros(10), grid, 4)
    with pytest.raises(FitError, match="0 < step"):
        time_grid(10.0, 0.0)
    with pytest.raises(FitError, match="different genes"):
        pool_moments(
            [
                {"count": 2, "sum": [1.0], "sumsq": [1.0], "genes": ["a"]},
                {"count": 2, "sum": [1.0], "sumsq": [1.0], "genes": ["b"]},
            ]
        )


def test_pool_moments_sums():
    pooled = pool_moments(
        [
            {"count": 2, "sum": [1.0, 2.0], "sumsq": [3.0, 4.0], "genes": ["a", "b"]},
            {"count": 3, "sum": [1.0, 1.0], "sumsq": [1.0, 1.0], "genes": ["a", "b"]},
        ]
    )
    assert pooled["count"] == 5
    np.testing.assert_array_equal(pooled["sum"], [2.0, 3.0])


def test_resolve_site_name():
    names = ["a", "b", "c"]
    assert resolve_site_name({"partition-id": 1, "num-partitions": 3}, names) == "b"
    assert resolve_site_name({"site": "hospital-x"}, names) == "hospital-x"
    with pytest.raises(SiteResolutionError, match="4 nodes but the federation config lists 3"):
        resolve_site_name({"partition-id": 1, "num-partitions": 4}, names)
    with pytest.raises(SiteResolutionError, match="neither 'site'"):
        resolve_site_name({}, names)


def test_assign_roles_by_site_or_cohort():
    infos = [SiteInfo(1, "c0-A1", "train", "c0", 10, 3), SiteInfo(2, "c1-B1", "train", "c1", 10, 3)]
    roles = {i.site: i.role for i in assign_roles(infos, ["c1"])}
    assert roles == {"c0-A1": "train", "c1-B1": "holdout"}
    with pytest.raises(FitError, match="not in the federation"):
        assign_roles(infos, ["c9"])
    with pytest.raises(FitError, match="same site"):
        assign_roles(infos + [SiteInfo(3, "c0-A1", "train", "c0", 1, 1)], None)


def test_a_site_declaring_itself_held_out_stays_held_out():
    infos = [SiteInfo(1, "h0", "train", "c0", 10, 3), SiteInfo(2, "h2", "holdout", "c1", 10, 3)]
    for heldout in (None, [], ["h0"]):
        roles = {i.site: i.role for i in assign_roles(infos, heldout)}
        assert roles["h2"] == "holdout"
    assert {i.site: i.role for i in assign_roles(infos, ["h0"])}["h0"] == "holdout"


def test_km_aggregates_are_grid_sized():
    n = 40
    time = RNG.exponential(20, size=n) + 0.1
    cens = (RNG.random(n) < 0.3).astype(float)
    risk = -time + RNG.normal(size=n)
    km = km_aggregates(time, cens, risk, np.linspace(0, 60, 5))
    assert len(km["km-low"]) == len(km["km-high"]) == 5
    assert km["km-n-low"] + km["km-n-high"] == n
    low, high = np.asarray(km["km-low"]), np.asarray(km["km-high"])
    assert low[0] == 1.0 and high[0] == 1.0
    for curve, members in ((low, risk < np.median(risk)), (high, risk >= np.median(risk))):
        inside = np.linspace(0, 60, 5) <= time[members].max()
        assert np.all(np.isfinite(curve[inside])) and np.all(np.diff(curve[inside]) <= 0)
        assert np.all(np.isnan(curve[~inside]))  # never extrapolated past the group's follow-up


def test_derived_seed_is_pure():
    assert derived_seed(0, 3, "a") == derived_seed(0, 3, "a")
    assert len({derived_seed(0, r, s) for r in range(3) for s in "ab"}) == 6
