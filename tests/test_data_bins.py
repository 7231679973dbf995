"""Survival bins: quantiles of event times, fitted on training sites and applied unchanged elsewhere."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedprog.data import CohortError, SurvivalBins


def test_edges_are_event_time_quartiles_with_extended_outer_edges() -> None:
    rng = np.random.default_rng(0)
    times = rng.exponential(20, 200) + 0.1
    cens = (rng.random(200) < 0.5).astype(int)
    bins = SurvivalBins.fit(times, cens, n_bins=4)
    _, qcut_edges = pd.qcut(times[cens == 0], q=4, retbins=True)
    np.testing.assert_allclose(bins.edges[1:-1], qcut_edges[1:-1])
    assert bins.edges[0] == pytest.approx(times.min() - 1e-6)
    assert bins.edges[-1] == pytest.approx(times.max() + 1e-6)
    labels = bins.transform(times)
    assert labels.dtype == np.int64 and set(labels) == {0, 1, 2, 3}
    # left-closed intervals: a time equal to an interior edge goes to the upper bin
    assert bins.transform([bins.edges[1]])[0] == 1


def test_fitted_on_training_sites_applied_unchanged_to_heldout() -> None:
    train_t = np.array([1.0, 2, 3, 4, 5, 6, 7, 8])
    bins = SurvivalBins.fit(train_t, np.zeros(8))
    state = bins.to_dict()
    heldout = np.array([0.01, 3.5, 500.0])
    assert bins.transform(heldout).tolist() == [0, 1, 3]  # outside the range: first / last bin
    assert bins.to_dict() == state
    assert SurvivalBins.from_dict(state).transform(heldout).tolist() == [0, 1, 3]


def test_too_few_events() -> None:
    with pytest.raises(CohortError, match=r"\(site-a\): 2 uncensored time\(s\) for 4 bins"):
        SurvivalBins.fit([1.0, 2, 3, 4], [0, 0, 1, 1], where="site-a")
    with pytest.raises(CohortError, match="tied event-time quantiles"):
        SurvivalBins.fit([5.0] * 8, [0] * 8)
