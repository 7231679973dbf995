"""Site discovery and federated fitting: survival bins and expression transform from training-site aggregates.

No patient-level value crosses a site boundary here. A training site sends (a) a histogram of its event times
on a fixed grid and (b) per-gene count, sum and sum of squares of its expression table; the server pools them
and fits the bins (quantiles of the pooled event-time histogram) and the expression transform
(``ExpressionTransform.from_moments``). Held-out sites are never asked for these aggregates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedprog.data.sites import ROLES

log = logging.getLogger(__name__)


class SiteResolutionError(LookupError):
    """A client could not tell which site it is (node config or partition id); the message says why."""


class FitError(ValueError):
    """The pooled aggregates cannot fit the bins or the transform (no events, inconsistent genes, ...)."""


@dataclass(frozen=True)
class SiteInfo:
    """What the start-of-run query learns about one node: no patient-level value."""

    node_id: int
    site: str
    role: str
    cohort: str
    n_cases: int
    n_events: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for results.json and checkpoints)."""
        return asdict(self)


def time_grid(max_months: float, step: float) -> np.ndarray:
    """Edges of the fixed event-time histogram grid.

    Parameters
    ----------
    max_months : float
        Upper end of the grid; later event times fall in the last bucket.
    step : float
        Bucket width in months.

    Returns
    -------
    ndarray, shape = (n_buckets + 1,), float64
        ``[0, step, 2 step, ..., max_months]``.
    """
    if not (max_months > 0 and step > 0 and step <= max_months):
        raise FitError(
            f"fit.time_grid_max={max_months} and fit.time_grid_step={step} must be 0 < step <= max"
        )
    n = int(math.ceil(max_months / step))
    return np.linspace(0.0, n * step, n + 1)


def event_histogram(times: np.ndarray, censorship: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of event (uncensored) times per bucket of ``edges``; the aggregate a training site sends.

    Parameters
    ----------
    times : ndarray, shape = (n_patients,), float
        Survival or censoring times in months.
    censorship : ndarray, shape = (n_patients,), {0, 1}
        1 = censored, 0 = event.
    edges : ndarray, shape = (n_buckets + 1,)
        From :func:`time_grid`; times beyond the last edge are counted in the last bucket.

    Returns
    -------
    ndarray, shape = (n_buckets,), float64
        Event counts.
    """
    times = np.asarray(times, dtype=float)
    events = np.asarray(censorship, dtype=float) == 0
    clipped = np.clip(times[events], edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    return counts.astype(np.float64)


def histogram_quantiles(counts: np.ndarray, edges: np.ndarray, probs: Sequence[float]) -> np.ndarray:
    """Quantiles of the distribution a histogram describes, linear within buckets.

    Parameters
    ----------
    counts : ndarray, shape = (n_buckets,)
        Pooled event counts.
    edges : ndarray, shape = (n_buckets + 1,)
        The grid.
    probs : sequence of float in [0, 1]
        Quantile levels.

    Returns
    -------
    ndarray, shape = (len(probs),)
        Times (months) at which the cumulative count reaches each level.
    """
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    if total <= 0:
        raise FitError("the training sites report no events: survival bins cannot be fitted")
    cumulative = np.concatenate([[0.0], np.cumsum(counts)]) / total
    out = []
    for p in probs:
        k = int(np.searchsorted(cumulative, p, side="left"))
        k = min(max(k, 1), len(edges) - 1)
        lo, hi = cumulative[k - 1], cumulative[k]
        frac = 0.0 if hi <= lo else (p - lo) / (hi - lo)
        out.append(edges[k - 1] + frac * (edges[k] - edges[k - 1]))
    return np.asarray(out)


def bin_edges_from_histogram(counts: np.ndarray, edges: np.ndarray, n_bins: int) -> np.ndarray:
    """Survival-bin edges from the pooled event histogram, as MCAT/SurvPath: quantiles of event times.

    Returns
    -------
    ndarray, shape = (n_bins + 1,)
        ``[0, q_1, ..., q_{n_bins-1}, edges[-1]]``: the outer edges are the grid's ends, so no patient's
        extreme time is needed (``SurvivalBins`` sends times outside them to the first or last bin).
    """
    if n_bins < 1:
        raise FitError(f"n_bins={n_bins} must be >= 1")
    inner = histogram_quantiles(counts, edges, [k / n_bins for k in range(1, n_bins)])
    if np.any(np.diff(inner) <= 0):
        raise FitError(
            f"pooled event histogram gives non-increasing bin edges {inner.tolist()}; use a finer grid"
        )
    return np.concatenate([[edges[0]], inner, [edges[-1]]])


def pool_moments(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the training sites' ``ExpressionTransform.moments`` (same genes, same order, same clip).

    Parameters
    ----------
    parts : sequence of mappings
        Each with ``count`` (int), ``sum`` and ``sumsq`` (shape = (n_genes,)) and ``genes`` (list of str).

    Returns
    -------
    dict
        The pooled ``count``, ``sum``, ``sumsq`` and the common ``genes``.
    """
    if not parts:
        raise FitError("no training site sent expression moments")
    genes = list(parts[0]["genes"])
    for part in parts[1:]:
        if list(part["genes"]) != genes:
            raise FitError(
                f"training sites sent expression moments over different genes "
                f"({len(genes)} vs {len(part['genes'])})"
            )
    return {
        "count": int(sum(int(p["count"]) for p in parts)),
        "sum": np.sum([np.asarray(p["sum"], dtype=np.float64) for p in parts], axis=0),
        "sumsq": np.sum([np.asarray(p["sumsq"], dtype=np.float64) for p in parts], axis=0),
        "genes": genes,
    }


def resolve_site_name(node_config: Mapping[str, Any], site_names: Sequence[str]) -> str:
    """Which site a client is: ``site`` in the node config (deployment) or ``partition-id`` (simulation).

    Parameters
    ----------
    node_config : mapping
        ``context.node_config``: deployment sets ``site`` (and ``data-root``, ``cohort``, ``role``,
        ``device``);
        simulation sets ``partition-id`` and ``num-partitions``.
    site_names : sequence of str
        The site table of the federation config, in order (simulation partitions index it).

    Raises
    ------
    SiteResolutionError
        When neither key is usable.
    """
    if "site" in node_config:
        return str(node_config["site"])
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        n = int(node_config.get("num-partitions", len(site_names)))
        if n != len(site_names):
            raise SiteResolutionError(
                f"simulation has {n} nodes but the federation config lists {len(site_names)} sites "
                f"{list(site_names)}"
            )
        if not 0 <= pid < len(site_names):
            raise SiteResolutionError(f"partition-id={pid} outside the site table {list(site_names)}")
        return site_names[pid]
    raise SiteResolutionError(
        f"node config {dict(node_config)} has neither 'site' (deployment) nor 'partition-id' (simulation)"
    )


def assign_roles(infos: Sequence[SiteInfo], heldout: Sequence[str] | None) -> list[SiteInfo]:
    """Apply the run's ``heldout`` list (site or cohort names, when given) over the roles the sites reported.

    Raises
    ------
    FitError
        When two nodes claim the same site, a held-out name matches no site, or a role is unknown.
    """
    names = [info.site for info in infos]
    cohorts = {info.cohort for info in infos}
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FitError(f"several nodes claim the same site(s) {duplicates}")
    if heldout is not None:
        unknown = sorted(set(heldout) - set(names) - cohorts)
        if unknown:
            raise FitError(
                f"heldout={list(heldout)} names site(s) {unknown} not in the federation {sorted(names)}"
            )
    out = []
    for info in infos:
        held = info.site in heldout or info.cohort in heldout if heldout is not None else False
        # The run's list can add held-out sites but never turn a site that declares itself held out into a
        # training site (a hospital's own role=holdout always wins).
        role = "holdout" if info.role == "holdout" or held else info.role
        if role not in ROLES:
            raise FitError(f"site {info.site}: role {role!r} is not one of {ROLES}")
        out.append(SiteInfo(info.node_id, info.site, role, info.cohort, info.n_cases, info.n_events))
    return sorted(out, key=lambda i: i.site)


def km_aggregates(
    time: np.ndarray, censorship: np.ndarray, risk: np.ndarray, grid: np.ndarray, *, min_at_risk: int = 1
) -> dict[str, float | int | list[float]]:
    """Kaplan-Meier curves of the median-split risk groups on a coarse grid: what a site sends for KM plots.

    Parameters
    ----------
    time, censorship : ndarray, shape = (n_patients,)
        Months; 1 = censored.
    risk : ndarray, shape = (n_patients,)
        Predicted risk, higher = worse; high-risk group = ``risk >= median(risk)`` (as ``logrank_split``).
    grid : ndarray, shape = (n_points,)
        Coarse time grid (months) chosen by the server (within the site's disclosure limits).
    min_at_risk : int
        A point where fewer of the group's cases are still at risk is sent as NaN (suppressed); 1 only hides
        the points past the group's follow-up.

    Returns
    -------
    dict
        ``km-grid``, ``km-low``, ``km-high`` (survival of each group at the grid points, NaN for an empty
        group), ``km-n-low``/``km-n-high`` and ``km-events-low``/``km-events-high`` (group sizes and events).
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    time = np.asarray(time, dtype=float)
    event = np.asarray(censorship, dtype=float) == 0
    risk = np.asarray(risk, dtype=float)
    high = risk >= np.median(risk)
    out: dict[str, float | int | list[float]] = {"km-grid": [float(g) for g in grid]}
    for name, members in (("low", ~high), ("high", high)):
        out[f"km-n-{name}"] = int(members.sum())
        out[f"km-events-{name}"] = int(event[members].sum())
        if not members.any():
            out[f"km-{name}"] = [math.nan] * len(grid)
            continue
        steps, prob = kaplan_meier_estimator(event[members], time[members])
        index = np.searchsorted(steps, grid, side="right") - 1  # last step at or before each grid point
        curve = np.where(index >= 0, prob[np.clip(index, 0, None)], 1.0)
        at_risk = (time[members][None, :] >= np.asarray(grid, dtype=float)[:, None]).sum(axis=1)
        curve = np.where(at_risk < max(int(min_at_risk), 1), math.nan, curve)  # small risk sets stay home
        out[f"km-{name}"] = [float(v) for v in curve]
    return out


def derived_seed(seed: int, server_round: int, site: str) -> int:
    """Client training seed as a pure function of (run seed, round, site): resumed runs repeat exactly."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{server_round}:{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
