"""Discrete survival-time bins (MCAT/SurvPath): event-time quantiles, fitted on training sites only."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedprog.data.errors import CohortError

DEFAULT_N_BINS = 4
EDGE_EPS = 1e-6  # the outer edges are (min - eps, max + eps) over ALL training times, as in SurvPath


class SurvivalBins:
    """Left-closed time intervals ``[edges[k], edges[k+1])``, k = 0..n_bins-1.

    Interior edges are the ``k / n_bins`` quantiles (linear interpolation, as pandas ``qcut``) of the
    uncensored training times; the outer edges are ``min - eps`` and ``max + eps`` of all training times.
    Times outside the fitted range (held-out sites) go to the first or last bin.
    """

    def __init__(self, edges: Sequence[float]) -> None:
        edges_arr = np.asarray(edges, dtype=np.float64)
        if edges_arr.ndim != 1 or len(edges_arr) < 2 or not np.all(np.diff(edges_arr) > 0):
            raise CohortError(
                f"SurvivalBins: edges must be strictly increasing (>= 2 values), got {edges_arr.tolist()}"
            )
        self.edges = edges_arr

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return len(self.edges) - 1

    @classmethod
    def fit(
        cls,
        times: Sequence[float] | np.ndarray,
        censorship: Sequence[float] | np.ndarray,
        n_bins: int = DEFAULT_N_BINS,
        *,
        where: str = "training data",
    ) -> SurvivalBins:
        """Fit the bins.

        Parameters
        ----------
        times : array-like, shape = (n_cases,)
            Survival times (months), > 0.
        censorship : array-like, shape = (n_cases,)
            1 = censored, 0 = event.
        n_bins : int
            Number of bins (4 in MCAT/SurvPath).
        where : str
            Named in error messages (e.g. the training sites).
        """
        t = np.asarray(times, dtype=np.float64)
        c = np.asarray(censorship, dtype=np.float64)
        if t.shape != c.shape or t.ndim != 1:
            raise CohortError(f"SurvivalBins.fit ({where}): times {t.shape} and censorship {c.shape} differ")
        if n_bins < 1:
            raise CohortError(f"SurvivalBins.fit ({where}): n_bins must be >= 1, got {n_bins}")
        events = t[c == 0]
        if len(events) < n_bins:
            raise CohortError(
                f"SurvivalBins.fit ({where}): {len(events)} uncensored time(s) for {n_bins} bins "
                f"(need >= {n_bins})"
            )
        edges = np.quantile(events, np.linspace(0.0, 1.0, n_bins + 1))
        edges[0] = t.min() - EDGE_EPS
        edges[-1] = t.max() + EDGE_EPS
        if not np.all(np.diff(edges) > 0):
            raise CohortError(
                f"SurvivalBins.fit ({where}): tied event-time quantiles "
                f"{np.round(edges, 4).tolist()}; use fewer bins"
            )
        return cls(edges)

    def transform(self, times: Sequence[float] | np.ndarray) -> np.ndarray:
        """Bin index per time.

        Parameters
        ----------
        times : array-like, shape = (n,)

        Returns
        -------
        np.ndarray
            int64, shape = (n,), values in 0..n_bins-1.
        """
        t = np.asarray(times, dtype=np.float64)
        return np.searchsorted(self.edges[1:-1], t, side="right").astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible state."""
        return {"edges": self.edges.tolist()}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> SurvivalBins:
        """Rebuild from :meth:`to_dict`."""
        return cls(state["edges"])

    def __repr__(self) -> str:
        return f"SurvivalBins(edges={np.round(self.edges, 3).tolist()})"
