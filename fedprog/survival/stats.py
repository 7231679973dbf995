"""Statistics over a rotation: bootstrap CIs of the C-index and paired comparisons of two settings.

Input is the long *predictions* table every rotation run writes (``predictions.csv.gz``, kept local: it holds
patient-level risks): one row per (target, seed, site, case) with columns :data:`PREDICTION_COLUMNS`.

The C-index of a (target, seed) is Harrell's over all the target's cases (its sites pooled). The bootstrap is
hierarchical: each replicate resamples patients with replacement within every site of a target (the same draw
for every seed, since every seed evaluates the same patients), then resamples the seeds with replacement; the
statistic is the mean over the drawn seeds (and, for ``overall``, the mean over targets). Paired comparisons
apply the same draws to both settings. Resampled patients enter as multiplicities ``w``, so a replicate's
C-index is ``(w' A w) / (w' B w)`` with ``A`` the concordant (ties 1/2) and ``B`` the comparable pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

PREDICTION_COLUMNS = ("target", "seed", "site", "case_id", "time", "censorship", "risk")
OVERALL = "overall"
TIED_TOL = 1e-8  # risk differences below this count as ties (sksurv's default)


class StatsError(ValueError):
    """Predictions that cannot be compared or summarized (missing columns, unmatched cases)."""


def pair_matrices(
    time: np.ndarray, censorship: np.ndarray, risk: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(concordant, comparable) pair matrices of Harrell's C-index, as sksurv counts them.

    Pair (i, j) is comparable when i has an event and ``time[i] < time[j]``, or the times tie and j is
    censored; it is concordant when ``risk[i] > risk[j]`` (1/2 for a tie within :data:`TIED_TOL`).
    """
    time, risk = np.asarray(time, float), np.asarray(risk, float)
    event = np.asarray(censorship) == 0
    earlier = time[:, None] < time[None, :]
    tied = (time[:, None] == time[None, :]) & ~event[None, :]
    comparable = (event[:, None] & (earlier | tied)).astype(float)
    gap = risk[:, None] - risk[None, :]
    score = np.where(np.abs(gap) <= TIED_TOL, 0.5, (gap > 0).astype(float))
    return comparable * score, comparable


def weighted_cindex(concordant: np.ndarray, comparable: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Harrell's C-index for each row of ``weights`` (patient multiplicities, shape ``(n_rep, n)``)."""
    weights = np.atleast_2d(weights)
    numerator = np.einsum("bi,ij,bj->b", weights, concordant, weights)
    denominator = np.einsum("bi,ij,bj->b", weights, comparable, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return numerator / denominator


def cindex(time: np.ndarray, censorship: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C-index (NaN without a comparable pair)."""
    concordant, comparable = pair_matrices(time, censorship, risk)
    return float(weighted_cindex(concordant, comparable, np.ones(len(risk)))[0])


@dataclass
class TargetFolds:
    """One target's predictions aligned over seeds: the same cases (sorted) for every seed."""

    target: str
    seeds: list[int]
    case_ids: np.ndarray
    sites: np.ndarray
    time: np.ndarray
    censorship: np.ndarray
    risk: np.ndarray  # (n_seeds, n_cases)

    def pair_matrices(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(concordant, comparable) per seed."""
        return [pair_matrices(self.time, self.censorship, r) for r in self.risk]


def check_predictions(frame: pd.DataFrame, name: str = "predictions") -> pd.DataFrame:
    """Raise :class:`StatsError` naming a missing column or a duplicated (target, seed, case)."""
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise StatsError(f"{name}: missing column(s) {missing}; expected {list(PREDICTION_COLUMNS)}")
    duplicated = frame.duplicated(["target", "seed", "case_id"])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise StatsError(f"{name}: case {row.case_id} appears twice for target {row.target}, seed {row.seed}")
    return frame.astype({"target": str, "site": str, "case_id": str, "seed": int})


def target_folds(frame: pd.DataFrame, name: str = "predictions") -> dict[str, TargetFolds]:
    """Split checked predictions into aligned :class:`TargetFolds` per target (in order of appearance)."""
    frame = check_predictions(frame, name)
    out = {}
    for target, rows in frame.groupby("target", sort=False):
        seeds = sorted(rows["seed"].unique().tolist())
        first = rows[rows["seed"] == seeds[0]].sort_values("case_id")
        risks = []
        for seed in seeds:
            these = rows[rows["seed"] == seed].sort_values("case_id")
            if these["case_id"].tolist() != first["case_id"].tolist():
                raise StatsError(
                    f"{name}: target {target}: seed {seed} evaluates other cases than seed {seeds[0]}"
                )
            risks.append(these["risk"].to_numpy(float))
        out[str(target)] = TargetFolds(
            str(target),
            seeds,
            first["case_id"].to_numpy(),
            first["site"].to_numpy(),
            first["time"].to_numpy(float),
            first["censorship"].to_numpy(float),
            np.vstack(risks),
        )
    return out


def _patient_weights(sites: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Multiplicities of each patient in ``n_boot`` resamples drawn with replacement within each site."""
    weights = np.zeros((n_boot, len(sites)))
    for site in np.unique(sites):
        members = np.flatnonzero(sites == site)
        weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)), n_boot)
    return weights


def _replicates(
    folds: TargetFolds, n_boot: int, rng: np.random.Generator, others: Sequence[TargetFolds] = ()
) -> tuple[np.ndarray, ...]:
    """Bootstrap means over seeds of ``folds`` (and of each aligned fold set in ``others``, same draws)."""
    weights = _patient_weights(folds.sites, n_boot, rng)
    draws = rng.integers(0, len(folds.seeds), (n_boot, len(folds.seeds)))
    out = []
    for fold_set in (folds, *others):
        per_seed = np.column_stack([weighted_cindex(a, b, weights) for a, b in fold_set.pair_matrices()])
        out.append(np.nanmean(np.take_along_axis(per_seed, draws, axis=1), axis=1))
    return tuple(out)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_summary(
    predictions: pd.DataFrame, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Per target and ``overall``: mean C-index over seeds with its hierarchical bootstrap CI.

    Returns columns ``target, c_index, ci_low, ci_high, sd_seeds, n_seeds, n, n_events``.
    """
    rng = np.random.default_rng(seed)
    rows, replicates = [], []
    for target, folds in target_folds(predictions).items():
        point = [cindex(folds.time, folds.censorship, r) for r in folds.risk]
        (boot,) = _replicates(folds, n_boot, rng)
        replicates.append(boot)
        low, high = _interval(boot, level)
        rows.append(_row(target, float(np.mean(point)), low, high, point, folds))
    if rows:
        overall = np.mean(replicates, axis=0)
        low, high = _interval(overall, level)
        frame = pd.DataFrame(rows)
        rows.append(
            {
                "target": OVERALL,
                "c_index": float(frame["c_index"].mean()),
                "ci_low": low,
                "ci_high": high,
                "sd_seeds": float("nan"),
                "n_seeds": int(frame["n_seeds"].min()),
                "n": int(frame["n"].sum()),
                "n_events": int(frame["n_events"].sum()),
            }
        )
    return pd.DataFrame(rows)


def _row(target: str, value: float, low: float, high: float, point: list[float], folds: TargetFolds) -> dict:
    return {
        "target": target,
        "c_index": value,
        "ci_low": low,
        "ci_high": high,
        "sd_seeds": float(np.std(point, ddof=1)) if len(point) > 1 else float("nan"),
        "n_seeds": len(folds.seeds),
        "n": len(folds.case_ids),
        "n_events": int((folds.censorship == 0).sum()),
    }


def paired_comparison(
    first: pd.DataFrame, second: pd.DataFrame, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> pd.DataFrame:
    """Difference ``first - second`` of the mean C-index on the same targets, seeds and cases.

    Per target and ``overall``: the difference, its paired bootstrap CI (the same patient and seed draws for
    both settings) and the Wilcoxon signed-rank p-value (two-sided, scipy) of the per-(target, seed)
    differences. Raises :class:`StatsError` when the two settings do not share targets, seeds and cases.
    """
    a, b = target_folds(first, "first"), target_folds(second, "second")
    if sorted(a) != sorted(b):
        raise StatsError(f"the settings rotate over other targets: {sorted(a)} vs {sorted(b)}")
    rng = np.random.default_rng(seed)
    rows, replicates, all_diffs = [], [], []
    for target, fa in a.items():
        fb = b[target]
        if fa.seeds != fb.seeds or not np.array_equal(fa.case_ids, fb.case_ids):
            raise StatsError(
                f"target {target}: the settings differ in seeds {fa.seeds} vs {fb.seeds} or cases"
            )
        diffs = [
            cindex(fa.time, fa.censorship, ra) - cindex(fb.time, fb.censorship, rb)
            for ra, rb in zip(fa.risk, fb.risk, strict=True)
        ]
        boot_a, boot_b = _replicates(fa, n_boot, rng, others=[fb])
        replicates.append(boot_a - boot_b)
        all_diffs.extend(diffs)
        rows.append(_paired_row(target, diffs, boot_a - boot_b, level))
    if rows:
        overall = _paired_row(OVERALL, all_diffs, np.mean(replicates, axis=0), level)
        overall["difference"] = float(np.mean([row["difference"] for row in rows]))
        rows.append(overall)
    return pd.DataFrame(rows)


def _paired_row(target: str, diffs: Sequence[float], boot: np.ndarray, level: float) -> dict:
    low, high = _interval(boot, level)
    return {
        "target": target,
        "difference": float(np.mean(diffs)),
        "ci_low": low,
        "ci_high": high,
        "wilcoxon_p": wilcoxon_p(diffs),
        "n_pairs": len(diffs),
    }


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value (scipy); 1.0 when every difference is zero, NaN if none."""
    values = np.asarray(differences, float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    if np.all(values == 0):
        return 1.0
    return float(wilcoxon(values).pvalue)
