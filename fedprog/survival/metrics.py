"""Survival metrics via scikit-survival: C-indices, IBS, time-dependent AUC, bootstrap, log-rank, KM plots."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sksurv.compare import compare_survival
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from fedprog.survival.losses import SurvivalInputError

__all__ = [
    "DEFAULT_N_TIMES",
    "DEFAULT_TIED_TOL",
    "DEFAULT_TIME_QUANTILES",
    "MetricUndefinedError",
    "NoComparablePairsError",
    "SurvivalInputError",
    "check_risk",
    "check_survival",
    "check_survival_curves",
    "evaluate_predictions",
    "evaluation_times",
    "event_weighted_mean",
    "harrell_cindex",
    "integrated_brier",
    "logrank_split",
    "stratified_harrell_cindex",
    "time_auc",
    "uno_cindex",
]

log = logging.getLogger(__name__)

DEFAULT_TIED_TOL = 1e-8
"""Risk scores closer than this are ties (sksurv's default, also the SurvPath/MCCSDG setting)."""
DEFAULT_TIME_QUANTILES = (0.1, 0.9)
"""Quantiles of the evaluated patients' observed times that bound the IBS / AUC time grid."""
DEFAULT_N_TIMES = 20
"""Number of (quantile-spaced) points in the IBS / AUC time grid before de-duplication."""


class MetricUndefinedError(ValueError):
    """Valid data on which a metric is undefined (no events, too few evaluation times, one risk group)."""


class NoComparablePairsError(MetricUndefinedError):
    """No pair of patients can be ordered (every patient censored, or no event before a later time)."""


# ----------------------------------------------------------------------------------------------------------
# Input checks: validate at the boundary and return clean arrays (sksurv's check_y_survival style)
# ----------------------------------------------------------------------------------------------------------


def _as_1d_float(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise SurvivalInputError(f"{name}: expected a 1-D array, got shape {array.shape}")
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise SurvivalInputError(f"{name}: expected numeric values, but found dtype {array.dtype}")
    array = array.astype(float)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise SurvivalInputError(
            f"{name}: {bad.size} non-finite value(s), first {array[bad[0]]} at index {bad[0]}"
        )
    return array


def check_survival(
    time: ArrayLike,
    censorship: ArrayLike,
    *,
    names: tuple[str, str] = ("time", "censorship"),
) -> tuple[np.ndarray, np.ndarray]:
    """Validate survival labels and convert censorship (1 = censored) to a boolean event indicator.

    Parameters
    ----------
    time : array-like, float, shape = (n_samples,)
        Follow-up in months (event or censoring time); finite and ``>= 0``.
    censorship : array-like, {0, 1} or bool, shape = (n_samples,)
        1 = censored, 0 = event (the SurvPath/MCAT convention of the on-disk labels).
    names : tuple of str, optional, default: ("time", "censorship")
        Argument names used in error messages (for example ``("train_time", "train_censorship")``).

    Returns
    -------
    event : ndarray, bool, shape = (n_samples,)
        ``True`` where the event was observed (``1 - censorship``).
    time : ndarray, float64, shape = (n_samples,)
        The checked times.

    Raises
    ------
    SurvivalInputError
        Wrong shape, empty, non-numeric, non-finite or negative times, censorship outside {0, 1}, or
        mismatched lengths; the message names the argument.

    Examples
    --------
    >>> check_survival([3.0, 5.0], [0, 1])
    (array([ True, False]), array([3., 5.]))
    """
    time_name, cens_name = names
    time_arr = _as_1d_float(time, time_name)
    cens_arr = _as_1d_float(censorship, cens_name)
    if time_arr.shape != cens_arr.shape:
        raise SurvivalInputError(
            f"{time_name} and {cens_name} differ in length: {time_arr.size} vs {cens_arr.size}"
        )
    if time_arr.size == 0:
        raise SurvivalInputError(f"{time_name}: no samples (empty array)")
    negative = np.flatnonzero(time_arr < 0)
    if negative.size:
        raise SurvivalInputError(
            f"{time_name}: survival times must be >= 0, found {time_arr[negative[0]]} at index {negative[0]}"
        )
    not_binary = np.flatnonzero((cens_arr != 0) & (cens_arr != 1))
    if not_binary.size:
        raise SurvivalInputError(
            f"{cens_name}: expected values in {{0, 1}} (1 = censored), found {cens_arr[not_binary[0]]} "
            f"at index {not_binary[0]}"
        )
    return cens_arr == 0, time_arr


def check_risk(risk: ArrayLike, n_samples: int, *, name: str = "risk") -> np.ndarray:
    """Validate risk scores (higher = worse prognosis).

    Parameters
    ----------
    risk : array-like, float, shape = (n_samples,)
        One finite risk score per patient.
    n_samples : int
        The number of patients the labels have.
    name : str, optional, default: "risk"
        Argument name used in error messages.

    Returns
    -------
    ndarray, float64, shape = (n_samples,)

    Raises
    ------
    SurvivalInputError
        Wrong shape or length, or a NaN/inf score (never dropped silently).
    """
    risk_arr = _as_1d_float(risk, name)
    if risk_arr.size != n_samples:
        raise SurvivalInputError(
            f"{name}: expected {n_samples} scores (one per patient), got {risk_arr.size}"
        )
    return risk_arr


def check_survival_curves(
    survival: ArrayLike, bin_edges: ArrayLike, n_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate predicted discrete survival curves and the bin edges they refer to.

    Parameters
    ----------
    survival : array-like, float, shape = (n_samples, n_bins)
        ``survival[i, k]``: predicted probability that patient ``i`` survives past bin ``k`` (in [0, 1]).
    bin_edges : array-like, float, shape = (n_bins + 1,)
        Strictly increasing edges in months (``SurvivalBins.edges``, fitted on the training sites); the
        outer edges may be infinite.
    n_samples : int
        The number of patients the labels have.

    Returns
    -------
    survival : ndarray, float64, shape = (n_samples, n_bins)
    bin_edges : ndarray, float64, shape = (n_bins + 1,)

    Raises
    ------
    SurvivalInputError
        Shapes that do not match, probabilities outside [0, 1], NaNs, edges not strictly increasing.
    """
    curves = np.asarray(survival, dtype=float)
    if curves.ndim != 2 or curves.shape[0] != n_samples or curves.shape[1] < 1:
        raise SurvivalInputError(f"survival: expected shape ({n_samples}, n_bins >= 1), got {curves.shape}")
    outside = np.argwhere(~((curves >= 0) & (curves <= 1)))
    if outside.size:
        i, k = outside[0]
        raise SurvivalInputError(
            f"survival: probabilities must lie in [0, 1], found {curves[i, k]} at patient {i}, bin {k}"
        )
    edges = np.asarray(bin_edges, dtype=float)
    if edges.ndim != 1 or edges.size != curves.shape[1] + 1:
        raise SurvivalInputError(
            f"bin_edges: expected {curves.shape[1] + 1} edges for {curves.shape[1]} bins, "
            f"got shape {edges.shape}"
        )
    if np.isnan(edges).any() or not (np.diff(edges) > 0).all():
        raise SurvivalInputError(f"bin_edges: must be strictly increasing without NaN, got {edges.tolist()}")
    return curves, edges


def _reference(
    train_time: ArrayLike | None,
    train_censorship: ArrayLike | None,
    event: np.ndarray,
    time: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Checked censoring-reference labels: the training data, or the evaluated patients when absent."""
    if (train_time is None) != (train_censorship is None):
        raise SurvivalInputError("train_time and train_censorship must be given together (or both None)")
    if train_time is None:
        log.info("no training labels given: the evaluated patients are their own censoring reference")
        return event, time
    train_event, train_time_arr = check_survival(
        train_time, train_censorship, names=("train_time", "train_censorship")
    )
    if not train_event.any():
        raise MetricUndefinedError(
            f"train_censorship: all {train_event.size} training patients are censored; sksurv cannot use "
            "them as censoring reference"
        )
    return train_event, train_time_arr


def _require_events(event: np.ndarray, what: str) -> None:
    if event.size < 2:
        raise NoComparablePairsError(f"{what} needs at least 2 patients, got {event.size}")
    if not event.any():
        raise NoComparablePairsError(f"{what}: all {event.size} patients are censored (no events)")


# ----------------------------------------------------------------------------------------------------------
# Concordance
# ----------------------------------------------------------------------------------------------------------


def harrell_cindex(
    time: ArrayLike, censorship: ArrayLike, risk: ArrayLike, *, tied_tol: float = DEFAULT_TIED_TOL
) -> float:
    """Harrell's concordance index of risk scores (sksurv ``concordance_index_censored``).

    Parameters
    ----------
    time : array-like, float, shape = (n_samples,)
        Follow-up in months.
    censorship : array-like, {0, 1}, shape = (n_samples,)
        1 = censored, 0 = event.
    risk : array-like, float, shape = (n_samples,)
        Risk scores: higher means an earlier expected event (not survival probabilities).
    tied_tol : float, optional, default: 1e-8
        Risk scores closer than this count as ties (1/2 concordant).

    Returns
    -------
    float
        The fraction of comparable pairs ordered correctly; 0.5 = random, 1 = perfect.

    Raises
    ------
    NoComparablePairsError
        Every patient censored, fewer than 2 patients, or no comparable pair.
    SurvivalInputError
        Invalid inputs (the message names the argument).

    Examples
    --------
    >>> harrell_cindex([1.0, 2.0, 3.0], [0, 0, 1], [3.0, 2.0, 1.0])
    1.0
    """
    event, time_arr = check_survival(time, censorship)
    risk_arr = check_risk(risk, time_arr.size)
    _require_events(event, "harrell_cindex")
    try:
        return float(concordance_index_censored(event, time_arr, risk_arr, tied_tol=tied_tol)[0])
    except NoComparablePairException as err:
        raise NoComparablePairsError(
            f"harrell_cindex: no comparable pairs among {event.size} patients ({int(event.sum())} events)"
        ) from err


def stratified_harrell_cindex(
    time: ArrayLike,
    censorship: ArrayLike,
    risk: ArrayLike,
    strata: ArrayLike,
    *,
    tied_tol: float = DEFAULT_TIED_TOL,
) -> float:
    """Harrell's C over the comparable pairs within each stratum (e.g. each source cancer), pooled.

    Pairs across strata are not compared, so a score that only separates strata with different baseline
    hazards earns nothing: the criterion that matches a target scored within one cancer. Each stratum's
    counts come from sksurv ``concordance_index_censored``; strata without a comparable pair add none.

    Examples
    --------
    >>> stratified_harrell_cindex([1.0, 2.0, 1.0, 2.0], [0, 0, 0, 0], [2.0, 1.0, 0.0, -1.0], [0, 0, 1, 1])
    1.0
    """
    event, time_arr = check_survival(time, censorship)
    risk_arr = check_risk(risk, time_arr.size)
    strata_arr = np.asarray(strata)
    if strata_arr.shape != time_arr.shape:
        raise SurvivalInputError(f"strata has shape {strata_arr.shape}, expected {time_arr.shape}")
    _require_events(event, "stratified_harrell_cindex")
    concordant = comparable = 0.0
    for stratum in np.unique(strata_arr):
        inside = strata_arr == stratum
        if event[inside].sum() == 0:
            continue
        try:
            _, conc, disc, tied, _ = concordance_index_censored(
                event[inside], time_arr[inside], risk_arr[inside], tied_tol=tied_tol
            )
        except NoComparablePairException:
            continue
        concordant += conc + 0.5 * tied
        comparable += conc + disc + tied
    if comparable == 0:
        raise NoComparablePairsError(
            f"stratified_harrell_cindex: no comparable pair within any of {np.unique(strata_arr).size} strata"
        )
    return concordant / comparable


# Uno's C-index: the truncation time ``tau`` is the last training time at which the censoring survival G is at
# least MIN_CENSOR_SURVIVAL (weights 1/G^2 <= 25), and the estimate is NaN (reason logged) when the IPCW
# weights leave fewer than MIN_EFFECTIVE_EVENT_FRACTION of the test events before tau as effective events.
MIN_CENSOR_SURVIVAL = 0.2
MIN_EFFECTIVE_EVENT_FRACTION = 0.25


def uno_truncation_time(
    train_time: ArrayLike, train_censorship: ArrayLike, *, min_censor_survival: float = MIN_CENSOR_SURVIVAL
) -> float:
    """The data-chosen truncation time of Uno's C-index: the last training time with ``G(t) >= min``.

    ``G`` is the training cases' censoring survival (reverse Kaplan-Meier). Past it the IPCW weights
    ``1 / G(t)^2`` explode and a handful of late events decide the estimate.
    """
    train_event, train_time_arr = check_survival(
        train_time, train_censorship, names=("train_time", "train_censorship")
    )
    grid, surv = kaplan_meier_estimator(~train_event, train_time_arr)
    # G just before t (the weight sksurv uses for an event at t) is the curve at the previous grid time
    before = np.r_[1.0, surv[:-1]]
    ok = grid[before >= min_censor_survival]
    return float(ok.max()) if len(ok) else float(grid[0])


def uno_cindex(
    time: ArrayLike,
    censorship: ArrayLike,
    risk: ArrayLike,
    train_time: ArrayLike,
    train_censorship: ArrayLike,
    tau: float | None = None,
    *,
    tied_tol: float = DEFAULT_TIED_TOL,
    return_tau: bool = False,
) -> float | tuple[float, float]:
    """Uno's IPCW concordance index, with the training data as censoring reference.

    Parameters
    ----------
    time, censorship : array-like, shape = (n_samples,)
        Labels of the evaluated patients (months; 1 = censored).
    risk : array-like, float, shape = (n_samples,)
        Risk scores, higher = worse.
    train_time, train_censorship : array-like, shape = (n_train,)
        Training labels; their Kaplan-Meier censoring curve ``G`` gives the weights ``1 / G(t_i)^2``.
    tau : float, optional, default: None
        Truncation time: only pairs whose earlier time is ``< tau`` count. ``None``: chosen from the data by
        :func:`uno_truncation_time` (``G(tau) >= 0.2``); a value beyond the training follow-up is capped at
        the largest training time.
    return_tau : bool
        Also return the truncation time used.

    Returns
    -------
    float, or (float, float) with ``return_tau``
        Uno's C in [0, 1] (and tau in months).

    Notes
    -----
    sksurv needs ``G > 0`` at every weighted test event, and ``G`` is only defined inside the training
    follow-up. Rather than editing the test times, the test events are restricted to those before the
    truncation ``tau`` (Uno et al. 2011); later test patients still take part as the longer-surviving member
    of a pair. With long follow-up, an untruncated estimate is driven by a few late events of huge weight
    (a value of 0.10 next to Harrell's 0.63 was seen); hence the data-chosen ``tau`` and the stability check.

    Raises
    ------
    NoComparablePairsError
        No events, or no comparable pair before ``tau``.
    MetricUndefinedError
        All training patients censored, or an unstable estimate: the effective number of IPCW-weighted test
        events before ``tau`` is below 25 % of them (the message gives both numbers and tau).
    """
    event, time_arr = check_survival(time, censorship)
    risk_arr = check_risk(risk, time_arr.size)
    _require_events(event, "uno_cindex")
    train_event, train_time_arr = _reference(train_time, train_censorship, event, time_arr)
    tau = _uno_tau(tau, train_event, train_time_arr)
    early = event & (time_arr < tau)
    if not early.any():
        raise NoComparablePairsError(f"uno_cindex: no test event before tau={tau:g} months")
    _check_uno_weights(train_event, train_time_arr, time_arr[early], tau)
    try:
        result = concordance_index_ipcw(
            Surv.from_arrays(train_event, train_time_arr),
            Surv.from_arrays(event, time_arr),
            risk_arr,
            tau=tau,
            tied_tol=tied_tol,
        )
    except NoComparablePairException as err:
        raise NoComparablePairsError(f"uno_cindex: no comparable pairs before tau={tau:g} months") from err
    return (float(result[0]), float(tau)) if return_tau else float(result[0])


def _uno_tau(tau: float | None, train_event: np.ndarray, train_time: np.ndarray) -> float:
    """The truncation time used: ``tau`` capped at the training follow-up, or chosen from the data (None)."""
    horizon = float(train_time.max())
    if tau is None:
        tau = uno_truncation_time(train_time, (~train_event).astype(float))
        log.info(
            "uno_cindex: truncation time tau=%.4g months chosen from the data (G(tau) >= %g)",
            tau,
            MIN_CENSOR_SURVIVAL,
        )
    elif tau > horizon:
        log.info("uno_cindex: tau=%g is beyond the training follow-up, using %g", tau, horizon)
        tau = horizon
    return tau


def _check_uno_weights(
    train_event: np.ndarray, train_time: np.ndarray, event_times: np.ndarray, tau: float
) -> None:
    """Raise :class:`MetricUndefinedError` when a few heavily weighted events dominate Uno's estimate."""
    grid, surv = kaplan_meier_estimator(~train_event, train_time)
    index = np.searchsorted(grid, event_times, side="left") - 1  # G just before each event time
    g = np.where(index >= 0, surv[np.clip(index, 0, None)], 1.0)
    if (g <= 0).any():
        raise MetricUndefinedError(f"uno_cindex: censoring survival reaches 0 before tau={tau:g} months")
    weights = 1.0 / np.square(g)
    effective = float(weights.sum() ** 2 / np.square(weights).sum())
    if effective < MIN_EFFECTIVE_EVENT_FRACTION * len(weights):
        raise MetricUndefinedError(
            f"uno_cindex: unstable: IPCW weights leave {effective:.1f} effective of {len(weights)} test "
            f"events before tau={tau:g} months (< {MIN_EFFECTIVE_EVENT_FRACTION:.0%})"
        )


# ----------------------------------------------------------------------------------------------------------
# Time-dependent metrics from discrete survival curves
# ----------------------------------------------------------------------------------------------------------


def evaluation_times(
    time: np.ndarray,
    train_time: np.ndarray,
    *,
    quantiles: Sequence[float] = DEFAULT_TIME_QUANTILES,
    n_times: int = DEFAULT_N_TIMES,
) -> np.ndarray:
    """The default time grid of the IBS and the time-dependent AUC.

    Parameters
    ----------
    time : ndarray, float, shape = (n_samples,)
        Observed times of the evaluated patients (months).
    train_time : ndarray, float, shape = (n_train,)
        Observed times of the censoring reference (training) patients.
    quantiles : pair of float, optional, default: (0.1, 0.9)
        The grid spans these quantiles of ``time``.
    n_times : int, optional, default: 20
        Number of quantile-spaced points (duplicates are dropped).

    Returns
    -------
    ndarray, float64, shape = (n_times_kept,)
        Sorted unique times inside ``[max(min time, min train_time), min(max time, max train_time))``: the
        range where both sksurv's test follow-up and the training censoring curve are defined.

    Raises
    ------
    MetricUndefinedError
        Fewer than two grid times fall inside that range.
    """
    low_q, high_q = quantiles
    if not 0 <= low_q < high_q <= 1 or n_times < 2:
        raise SurvivalInputError(
            f"quantiles must satisfy 0 <= q0 < q1 <= 1 and n_times >= 2, got {quantiles}, {n_times}"
        )
    lower = max(time.min(), train_time.min())
    upper = min(time.max(), train_time.max())
    grid = np.unique(np.quantile(time, np.linspace(low_q, high_q, n_times)))
    grid = grid[(grid >= lower) & (grid < upper)]
    if grid.size < 2:
        raise MetricUndefinedError(
            f"fewer than 2 evaluation times inside the common follow-up [{lower:g}, {upper:g}) of the "
            "evaluated and the training patients"
        )
    return grid


def _time_metric_inputs(
    time: ArrayLike,
    censorship: ArrayLike,
    train_time: ArrayLike,
    train_censorship: ArrayLike,
    times: ArrayLike | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked labels, the time grid and the test times capped just above it (see ``integrated_brier``)."""
    event, time_arr = check_survival(time, censorship)
    _require_events(event, "time-dependent metric")
    train_event, train_time_arr = _reference(train_time, train_censorship, event, time_arr)
    lower = max(time_arr.min(), train_time_arr.min())
    upper = min(time_arr.max(), train_time_arr.max())
    if times is None:
        grid = evaluation_times(time_arr, train_time_arr)
    else:
        grid = np.unique(_as_1d_float(times, "times"))
        if grid.size == 0:
            raise SurvivalInputError("times: empty evaluation grid")
        if grid.min() < lower or grid.max() >= upper:
            raise SurvivalInputError(
                f"times: must lie inside the common follow-up [{lower:g}, {upper:g}), got "
                f"[{grid.min():g}, {grid.max():g}]"
            )
    cap = 0.5 * (grid[-1] + upper)  # in (last grid time, upper): G(cap) > 0 and cap < max test time
    return event, np.minimum(time_arr, cap), train_event, train_time_arr, grid


def _survival_at(curves: np.ndarray, edges: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Read step-function survival curves at ``times``: shape (n_samples, n_bins) -> (n_samples, n_times)."""
    bin_index = np.searchsorted(edges[1:-1], times, side="right")  # (n_times,) in 0..n_bins-1
    return curves[:, bin_index]


def integrated_brier(
    time: ArrayLike,
    censorship: ArrayLike,
    survival: ArrayLike,
    bin_edges: ArrayLike,
    train_time: ArrayLike,
    train_censorship: ArrayLike,
    *,
    times: ArrayLike | None = None,
) -> float:
    """Integrated Brier score of predicted discrete survival curves (IPCW, sksurv ``integrated_brier_score``).

    Parameters
    ----------
    time, censorship : array-like, shape = (n_samples,)
        Labels of the evaluated patients (months; 1 = censored).
    survival : array-like, float, shape = (n_samples, n_bins)
        ``survival[i, k]``: probability of surviving past bin ``k`` (for example ``survival_from_logits``).
    bin_edges : array-like, float, shape = (n_bins + 1,)
        Bin edges in months, fitted on the training sites.
    train_time, train_censorship : array-like, shape = (n_train,)
        Training labels, the censoring reference.
    times : array-like, float, shape = (n_times,), optional
        Evaluation grid; default :func:`evaluation_times` (quantiles 0.1-0.9 of the evaluated times, inside
        the common follow-up of evaluated and training patients).

    Returns
    -------
    float
        IBS over the grid (0 = perfect; 0.25 = constant prediction 0.5). Lower is better.

    Notes
    -----
    The curves are step functions over the bins: at a time ``t`` inside bin ``k`` (``edges[k] <= t <
    edges[k+1]``, the outer bins extended to +-infinity) the survival probability is ``survival[:, k]``, its
    value at the end of that bin. sksurv requires grid times below the largest test time and training
    censoring weights ``G(t) > 0``; test times after the last grid time are therefore capped at a point
    between the last grid time and the follow-up limit. This changes no score: such a patient is a control
    (still event-free) at every grid time either way.
    """
    event, capped, train_event, train_time_arr, grid = _time_metric_inputs(
        time, censorship, train_time, train_censorship, times
    )
    if grid.size < 2:
        raise SurvivalInputError(f"times: the IBS integrates over at least 2 times, got {grid.tolist()}")
    curves, edges = check_survival_curves(survival, bin_edges, event.size)
    estimate = _survival_at(curves, edges, grid)  # (n_samples, n_times)
    return float(
        integrated_brier_score(
            Surv.from_arrays(train_event, train_time_arr), Surv.from_arrays(event, capped), estimate, grid
        )
    )


def time_auc(
    time: ArrayLike,
    censorship: ArrayLike,
    survival: ArrayLike | None,
    bin_edges: ArrayLike | None,
    train_time: ArrayLike,
    train_censorship: ArrayLike,
    *,
    risk: ArrayLike | None = None,
    times: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Cumulative/dynamic time-dependent AUC (sksurv ``cumulative_dynamic_auc``).

    Parameters
    ----------
    time, censorship : array-like, shape = (n_samples,)
        Labels of the evaluated patients (months; 1 = censored).
    survival : array-like, float, shape = (n_samples, n_bins), or None
        Predicted discrete survival curves; the score at ``t`` is ``1 - S(t)`` (step function as in
        :func:`integrated_brier`). ``None`` to use ``risk`` instead.
    bin_edges : array-like, float, shape = (n_bins + 1,), or None
        Bin edges in months (required with ``survival``).
    train_time, train_censorship : array-like, shape = (n_train,)
        Training labels, the censoring reference.
    risk : array-like, float, shape = (n_samples,), optional
        Time-independent risk scores (higher = worse), used when ``survival`` is None (Cox models).
    times : array-like, float, shape = (n_times,), optional
        Evaluation grid; default :func:`evaluation_times`.

    Returns
    -------
    times : ndarray, float64, shape = (n_kept,)
        Grid times used: those with at least one event at or before them.
    auc : ndarray, float64, shape = (n_kept,)
        AUC at each time.
    mean_auc : float
        The AUC averaged over the grid, weighted by the test Kaplan-Meier event probability (sksurv).

    Raises
    ------
    MetricUndefinedError
        No event at or before any grid time, or too few grid times.
    """
    event, capped, train_event, train_time_arr, grid = _time_metric_inputs(
        time, censorship, train_time, train_censorship, times
    )
    has_case = np.array([(event & (capped <= t)).any() for t in grid])
    if not has_case.any():
        raise MetricUndefinedError("time_auc: no event at or before any evaluation time")
    if not has_case.all():
        log.info("time_auc: dropping %d grid time(s) with no earlier event", int((~has_case).sum()))
    grid = grid[has_case]
    if survival is not None:
        if bin_edges is None:
            raise SurvivalInputError("bin_edges: required together with survival")
        curves, edges = check_survival_curves(survival, bin_edges, event.size)
        estimate = 1.0 - _survival_at(curves, edges, grid)  # (n_samples, n_kept) risk of event by t
    elif risk is not None:
        estimate = check_risk(risk, event.size)
    else:
        raise SurvivalInputError("time_auc: give either survival (with bin_edges) or risk")
    auc, mean_auc = cumulative_dynamic_auc(
        Surv.from_arrays(train_event, train_time_arr), Surv.from_arrays(event, capped), estimate, grid
    )
    return grid, np.asarray(auc, dtype=float), float(mean_auc)


# ----------------------------------------------------------------------------------------------------------
# Uncertainty, risk groups, summaries
# ----------------------------------------------------------------------------------------------------------


def median_split(risk: np.ndarray) -> np.ndarray:
    """High-risk indicator: ``risk >= median(risk)``, shape (n_samples,) bool."""
    return risk >= np.median(risk)


def logrank_split(time: ArrayLike, censorship: ArrayLike, risk: ArrayLike) -> tuple[float, float]:
    """Log-rank test between the median-split risk groups (high = ``risk >= median``).

    Parameters
    ----------
    time, censorship : array-like, shape = (n_samples,)
        Labels (months; 1 = censored).
    risk : array-like, float, shape = (n_samples,)
        Risk scores, higher = worse.

    Returns
    -------
    statistic : float
        Chi-square statistic (1 degree of freedom).
    p_value : float
        Two-sided p-value.

    Raises
    ------
    MetricUndefinedError
        No events, all patients in one group (constant risk), or no event while both groups are at risk.
    """
    event, time_arr = check_survival(time, censorship)
    risk_arr = check_risk(risk, time_arr.size)
    _require_events(event, "logrank_split")
    high = median_split(risk_arr)
    if high.all() or not high.any():
        raise MetricUndefinedError("logrank_split: the median split leaves one group empty (constant risk?)")
    try:
        statistic, p_value = compare_survival(Surv.from_arrays(event, time_arr), high.astype(int))
    except np.linalg.LinAlgError as err:
        raise MetricUndefinedError(
            "logrank_split: zero variance (no event while both risk groups were at risk)"
        ) from err
    return float(statistic), float(p_value)


def event_weighted_mean(values: ArrayLike, n_events: ArrayLike) -> float:
    """Mean of per-site metrics weighted by each site's number of events (NaN sites are left out).

    Parameters
    ----------
    values : array-like, float, shape = (n_sites,)
        One metric per site (for example C-indices); NaN marks a site where it was undefined.
    n_events : array-like, int, shape = (n_sites,)
        Events per site: a C-index rests on the comparable pairs anchored at events, so a site with few
        events must not count as much as a large one.

    Returns
    -------
    float
        ``sum(n_events * values) / sum(n_events)`` over sites with a finite value; NaN (logged) when no
        site has both a value and an event.

    Examples
    --------
    >>> event_weighted_mean([0.6, 0.8], [30, 10])
    0.65
    """
    vals = np.asarray(values, dtype=float)
    weights = _as_1d_float(n_events, "n_events")
    if vals.ndim != 1 or vals.shape != weights.shape:
        raise SurvivalInputError(
            f"values and n_events must be 1-D of equal length, got {vals.shape}, {weights.shape}"
        )
    if (weights < 0).any():
        raise SurvivalInputError(f"n_events: must be >= 0, got {weights.tolist()}")
    keep = np.isfinite(vals) & (weights > 0)
    if (~keep).any():
        log.info(
            "event_weighted_mean: leaving out %d site(s) with a NaN value or no events", int((~keep).sum())
        )
    if not keep.any():
        log.warning("event_weighted_mean: no site has both a value and an event; result is NaN")
        return math.nan
    return float(np.average(vals[keep], weights=weights[keep]))


# ----------------------------------------------------------------------------------------------------------
# Plot and one-call evaluation
# ----------------------------------------------------------------------------------------------------------


def _or_nan(name: str, compute: Callable[[], float]) -> float:
    """Run ``compute``; on :class:`MetricUndefinedError` log the reason at WARNING and return NaN."""
    try:
        return compute()
    except MetricUndefinedError as err:
        log.warning("%s is NaN: %s", name, err)
        return math.nan


def _optional_curves(
    survival: ArrayLike | None, bin_edges: ArrayLike | None, n_samples: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Checked ``(curves, edges)``, or ``(None, None)`` without predicted survival curves."""
    if survival is None:
        return None, None
    if bin_edges is None:
        raise SurvivalInputError("bin_edges: required together with survival")
    return check_survival_curves(survival, bin_edges, n_samples)


def _ipcw_reference(
    time: np.ndarray, censorship: np.ndarray, train_time: ArrayLike | None, train_censorship: ArrayLike | None
) -> tuple[ArrayLike, ArrayLike]:
    """The censoring reference of the IPCW metrics: the training labels, else the evaluated patients."""
    if (train_time is None) != (train_censorship is None):
        raise SurvivalInputError("train_time and train_censorship must be given together (or both None)")
    if train_time is None or train_censorship is None:
        log.info(
            "evaluate_predictions: no training labels; IPCW metrics use the evaluated patients as reference"
        )
        return time, censorship
    return train_time, train_censorship


def evaluate_predictions(
    time: ArrayLike,
    censorship: ArrayLike,
    risk: ArrayLike,
    survival: ArrayLike | None = None,
    bin_edges: ArrayLike | None = None,
    train_time: ArrayLike | None = None,
    train_censorship: ArrayLike | None = None,
) -> dict[str, Any]:
    """All metrics of one evaluation, NaN (with the reason logged at WARNING) where undefined.

    Parameters
    ----------
    time, censorship : array-like, shape = (n_samples,)
        Labels (months; 1 = censored).
    risk : array-like, float, shape = (n_samples,)
        Risk scores, higher = worse.
    survival : array-like, float, shape = (n_samples, n_bins), optional
        Predicted discrete survival curves (needed for ``ibs``; ``mean_auc`` falls back to ``risk``).
    bin_edges : array-like, float, shape = (n_bins + 1,), optional
        Bin edges of ``survival`` in months.
    train_time, train_censorship : array-like, shape = (n_train,), optional
        Censoring reference for the IPCW metrics; when absent, the evaluated patients serve as their own
        reference (logged at INFO).

    Returns
    -------
    dict
        ``c_index`` (Harrell), ``c_index_ipcw`` (Uno, tau chosen from the training censoring curve and
        reported as ``c_index_ipcw_tau`` in months), ``ibs``, ``mean_auc``,
        ``logrank_p`` (median split): float, NaN when undefined; ``n``, ``n_events``: int.

    Raises
    ------
    SurvivalInputError
        Invalid inputs (these are bugs, not undefined metrics).
    """
    event, time_arr = check_survival(time, censorship)
    cens = (~event).astype(float)
    risk_arr = check_risk(risk, time_arr.size)
    curves, edges = _optional_curves(survival, bin_edges, time_arr.size)
    ref_time, ref_cens = _ipcw_reference(time_arr, cens, train_time, train_censorship)

    def ibs() -> float:
        if curves is None:
            raise MetricUndefinedError("no predicted survival curves (risk-only model)")
        return integrated_brier(time_arr, cens, curves, edges, ref_time, ref_cens)

    def mean_auc() -> float:
        if curves is None:
            return time_auc(time_arr, cens, None, None, ref_time, ref_cens, risk=risk_arr)[2]
        return time_auc(time_arr, cens, curves, edges, ref_time, ref_cens)[2]

    tau = _or_nan("c_index_ipcw_tau", lambda: uno_truncation_time(ref_time, ref_cens))
    return {
        "c_index": _or_nan("c_index", lambda: harrell_cindex(time_arr, cens, risk_arr)),
        "c_index_ipcw": _or_nan(
            "c_index_ipcw", lambda: uno_cindex(time_arr, cens, risk_arr, ref_time, ref_cens, tau=tau)
        ),
        "c_index_ipcw_tau": tau,
        "ibs": _or_nan("ibs", ibs),
        "mean_auc": _or_nan("mean_auc", mean_auc),
        "logrank_p": _or_nan("logrank_p", lambda: logrank_split(time_arr, cens, risk_arr)[1]),
        "n": int(time_arr.size),
        "n_events": int(event.sum()),
    }
