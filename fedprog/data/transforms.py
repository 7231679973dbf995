"""Feature transforms fitted on training data only: expression (clip + standardize, rank) and tabular.

Both are serializable (``state_dict``) so that a fitted transform travels with a model and is applied
unchanged to held-out sites; ``ExpressionTransform.from_moments`` fits it from per-site aggregate statistics
(federation).

Expression methods
------------------
``clip_standardize`` (default)
    x clipped to [-clip, clip] (``clip`` default 50: above the range of log2 expression, it removes the
    |z| > 10^3 artefacts of cBioPortal z-scores; use ~10 for z-score matrices), then z = (x - mean_g) / std_g
    with the per-gene mean/std (population, ddof=0) of the clipped TRAINING values, then z clipped to
    [-z_clip, z_clip] (default 5). A gene whose training std is below ``min_std`` gets std 1 (logged).
``rank``
    Per-sample ranks over the genes (ties averaged) mapped to normal scores
    ``Phi^-1((rank - 0.5) / n_genes)``; needs no fitting beyond fixing the gene list.
``none``
    Values passed through (only checked to be finite).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import ndtri
from scipy.stats import rankdata

from fedprog.data.errors import CohortError, GeneMismatchError, InvalidValueError, preview

log = logging.getLogger(__name__)

METHODS = ("clip_standardize", "rank", "none")
DEFAULT_CLIP = 50.0
DEFAULT_Z_CLIP = 5.0
DEFAULT_MIN_STD = 1e-8
MISSING_LEVEL = "<missing>"


def _finite_matrix(df: pd.DataFrame, what: str) -> np.ndarray:
    values = df.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise InvalidValueError(
            f"{what}: NaN or infinite value(s) in column(s) "
            f"{preview(list(dict.fromkeys(df.columns[cols])), 3)} "
            f"for case(s) {preview(list(dict.fromkeys(df.index[rows])))}"
        )
    return values


class ExpressionTransform:
    """Per-gene transform of the expression table (see the module docstring for the methods).

    Parameters
    ----------
    method : {"clip_standardize", "rank", "none"}
    clip : float or None
        Bound applied to raw values before the moments (None: no raw clipping).
    z_clip : float or None
        Bound applied to the standardized values (None: no clipping).
    min_std : float
        Genes with a smaller training std get std 1.
    """

    def __init__(
        self,
        method: str = "clip_standardize",
        clip: float | None = DEFAULT_CLIP,
        z_clip: float | None = DEFAULT_Z_CLIP,
        min_std: float = DEFAULT_MIN_STD,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"ExpressionTransform: method={method!r} is not one of {list(METHODS)}")
        self.method = method
        self.clip = None if clip is None else float(clip)
        self.z_clip = None if z_clip is None else float(z_clip)
        self.min_std = float(min_std)
        self.genes: list[str] | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.count = 0

    # ------------------------------------------------------------------ fitting
    @property
    def fitted(self) -> bool:
        """Whether ``transform`` can run (``rank``/``none`` need no fit)."""
        return self.method != "clip_standardize" or self.mean is not None

    def _clipped(self, values: np.ndarray) -> np.ndarray:
        return values if self.clip is None else np.clip(values, -self.clip, self.clip)

    def moments(self, df: pd.DataFrame) -> dict[str, Any]:
        """Aggregate statistics of (clipped) training values, summable across sites.

        Parameters
        ----------
        df : DataFrame, shape = (n_cases, n_genes)
            Expression indexed by case_id. A column that is NaN for every case is a gene the site lacks
            (``gene_policy: union``, see :mod:`fedprog.data.harmonize`): it counts 0 cases; any other NaN
            is an error.

        Returns
        -------
        dict
            ``count`` (int, cases), ``gene_count`` (int array, cases measured per gene), ``sum`` and
            ``sumsq`` (float64 arrays, shape = (n_genes,)), ``genes`` (list).
        """
        absent = df.isna().all(axis=0).to_numpy() if len(df) else np.zeros(df.shape[1], dtype=bool)
        present = _finite_matrix(df.loc[:, ~absent], "expression (fit)")
        values = np.zeros(df.shape, dtype=np.float64)
        values[:, ~absent] = self._clipped(present)
        gene_count = np.where(absent, 0, df.shape[0]).astype(np.int64)
        return {
            "count": int(values.shape[0]),
            "gene_count": gene_count,
            "sum": values.sum(axis=0),
            "sumsq": np.square(values).sum(axis=0),
            "genes": [str(g) for g in df.columns],
        }

    def fit(self, df: pd.DataFrame) -> ExpressionTransform:
        """Fit on TRAINING expression ``df`` (shape = (n_cases, n_genes)); returns self."""
        return self.fit_parts([df])

    def fit_parts(self, parts: Sequence[pd.DataFrame]) -> ExpressionTransform:
        """Fit on several TRAINING sites' expression (same columns; a gene a site lacks is an all-NaN column
        there and counts no case), pooling their :meth:`moments`; returns self."""
        if not parts:
            raise CohortError("ExpressionTransform.fit_parts: no training expression")
        self.genes = [str(g) for g in parts[0].columns]
        for i, part in enumerate(parts[1:], start=1):
            if [str(g) for g in part.columns] != self.genes:
                raise GeneMismatchError(f"ExpressionTransform.fit_parts: part {i} has other gene columns")
        if self.method == "clip_standardize":
            ms = [self.moments(part) for part in parts]
            self._set_moments(
                sum(m["count"] for m in ms),
                np.sum([m["sum"] for m in ms], axis=0),
                np.sum([m["sumsq"] for m in ms], axis=0),
                np.sum([m["gene_count"] for m in ms], axis=0),
            )
        return self

    @classmethod
    def from_moments(
        cls,
        count: int,
        sum: Sequence[float] | np.ndarray,  # noqa: A002 - the statistic's name
        sumsq: Sequence[float] | np.ndarray,
        *,
        genes: Sequence[str],
        method: str = "clip_standardize",
        clip: float | None = DEFAULT_CLIP,
        z_clip: float | None = DEFAULT_Z_CLIP,
        min_std: float = DEFAULT_MIN_STD,
        gene_count: Sequence[int] | np.ndarray | None = None,
    ) -> ExpressionTransform:
        """Build a fitted transform from summed :meth:`moments` of the training sites (same ``clip``!).

        ``gene_count`` (summed per-gene case counts) is needed only when a training site lacks genes
        (``gene_policy: union``); by default every gene counts ``count`` cases.
        """
        transform = cls(method=method, clip=clip, z_clip=z_clip, min_std=min_std)
        transform.genes = [str(g) for g in genes]
        transform._set_moments(
            int(count),
            np.asarray(sum, dtype=np.float64),
            np.asarray(sumsq, dtype=np.float64),
            None if gene_count is None else np.asarray(gene_count, dtype=np.float64),
        )
        return transform

    def _set_moments(
        self, count: int, total: np.ndarray, total_sq: np.ndarray, gene_count: np.ndarray | None = None
    ) -> None:
        assert self.genes is not None
        if total.shape != (len(self.genes),) or total_sq.shape != (len(self.genes),):
            raise ValueError(
                f"ExpressionTransform: moments of shape {total.shape}/{total_sq.shape} "
                f"for {len(self.genes)} genes"
            )
        if count < 2:
            raise CohortError(
                f"ExpressionTransform: cannot standardize from {count} training case(s) (need >= 2)"
            )
        counts = np.full(len(self.genes), float(count)) if gene_count is None else gene_count.astype(float)
        unmeasured = counts < 1
        if unmeasured.any():
            log.warning(
                "ExpressionTransform: %d gene(s) measured by no training case get mean 0, std 1: %s",
                int(unmeasured.sum()),
                preview(np.asarray(self.genes)[unmeasured]),
            )
        safe = np.maximum(counts, 1.0)
        mean = total / safe
        var = np.maximum(total_sq / safe - np.square(mean), 0.0)
        std = np.sqrt(var)
        flat = (std < self.min_std) & ~unmeasured
        std = np.where(unmeasured, 1.0, std)
        if flat.any():
            log.warning(
                "ExpressionTransform: %d gene(s) constant in the training data get std 1: %s",
                int(flat.sum()),
                preview(np.asarray(self.genes)[flat]),
            )
            std = np.where(flat, 1.0, std)
        self.count, self.mean, self.std = count, mean, std

    # ------------------------------------------------------------------ applying
    def transform(self, df: pd.DataFrame, *, impute_missing: bool = False) -> np.ndarray:
        """Transform expression with the fitted state (never refits).

        Parameters
        ----------
        df : DataFrame, shape = (n_cases, n_genes_in_table)
            Must hold every fitted gene (extra columns are ignored) unless ``impute_missing``.
        impute_missing : bool
            Genes absent from ``df`` (or all-NaN columns) are imputed at the training mean: 0 after
            ``clip_standardize``; 0 (the median normal score) for ``rank``; the training mean, else 0, for
            ``none``. Callers check the allowed count first (:func:`fedprog.data.harmonize.missing_genes`).

        Returns
        -------
        np.ndarray
            float32, shape = (n_cases, n_genes), columns in ``self.genes`` order.
        """
        if not self.fitted:
            raise RuntimeError(
                "ExpressionTransform.transform called before fit / from_moments / load_state_dict"
            )
        genes = self.genes if self.genes is not None else [str(g) for g in df.columns]
        absent = np.array([g not in df.columns or bool(df[g].isna().all()) for g in genes], dtype=bool)
        if absent.any() and not impute_missing:
            missing = [g for g, a in zip(genes, absent, strict=True) if a]
            raise GeneMismatchError(
                f"expression table lacks {len(missing)} of the transform's {len(genes)} genes: "
                f"{preview(missing)}"
            )
        present = [g for g, a in zip(genes, absent, strict=True) if not a]
        values = np.zeros((len(df), len(genes)), dtype=np.float64)
        values[:, ~absent] = _finite_matrix(df[present], "expression")
        if self.method == "clip_standardize":
            assert self.mean is not None and self.std is not None
            values[:, absent] = self.mean[absent]
            values = (self._clipped(values) - self.mean) / self.std
            values[:, absent] = 0.0  # exactly the training mean, even where the mean lies beyond the clip
            if self.z_clip is not None:
                values = np.clip(values, -self.z_clip, self.z_clip)
        elif self.method == "rank":
            sub = values[:, ~absent]
            ranks = rankdata(sub, axis=1, method="average")
            values[:, ~absent] = ndtri((ranks - 0.5) / max(sub.shape[1], 1))
            values[:, absent] = 0.0
        elif self.mean is not None:
            values[:, absent] = self.mean[absent]
        return values.astype(np.float32)

    # ------------------------------------------------------------------ serialization
    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state (lists and scalars)."""
        return {
            "method": self.method,
            "clip": self.clip,
            "z_clip": self.z_clip,
            "min_std": self.min_std,
            "genes": self.genes,
            "count": self.count,
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> ExpressionTransform:
        """Restore a :meth:`state_dict`; returns self."""
        self.__init__(state["method"], state["clip"], state["z_clip"], state.get("min_std", DEFAULT_MIN_STD))  # type: ignore[misc]
        self.genes = None if state["genes"] is None else list(state["genes"])
        self.count = int(state.get("count", 0))
        self.mean = None if state["mean"] is None else np.asarray(state["mean"], dtype=np.float64)
        self.std = None if state["std"] is None else np.asarray(state["std"], dtype=np.float64)
        return self

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ExpressionTransform:
        """A new transform from a :meth:`state_dict`."""
        return cls().load_state_dict(state)

    def __repr__(self) -> str:
        n = "?" if self.genes is None else len(self.genes)
        return (
            f"ExpressionTransform(method={self.method!r}, clip={self.clip}, z_clip={self.z_clip}, genes={n})"
        )


class TabularTransform:
    """Encode a tabular strong modality (clinical variables) into a float matrix, fitted on training data.

    Numeric columns are standardized with the training mean/std (population; std < ``min_std`` -> 1) when
    ``standardize`` (FLamby feeds raw features: ``standardize=False``). A numeric NaN is replaced by the
    training mean, and a ``<column>__missing`` 0/1 indicator is appended for every numeric column with NaN in
    the training data. Categorical columns are one-hot encoded over the training levels (NaN is the level
    ``<missing>``); an unseen level encodes as all zeros (logged).

    Parameters
    ----------
    categorical : sequence of str
        Columns to one-hot encode.
    standardize : bool
        Standardize numeric columns.
    """

    def __init__(
        self, categorical: Sequence[str] = (), standardize: bool = True, min_std: float = DEFAULT_MIN_STD
    ) -> None:
        self.categorical = [str(c) for c in categorical]
        self.standardize = bool(standardize)
        self.min_std = float(min_std)
        self.columns: list[str] | None = None
        self.numeric: list[str] = []
        self.mean: dict[str, float] = {}
        self.std: dict[str, float] = {}
        self.indicators: list[str] = []
        self.levels: dict[str, list[str]] = {}

    def fit(self, df: pd.DataFrame) -> TabularTransform:
        """Fit on TRAINING rows ``df`` (shape = (n_cases, n_columns)); returns self."""
        self.columns = [str(c) for c in df.columns]
        stray = [c for c in self.categorical if c not in df.columns]
        if stray:
            raise GeneMismatchError(f"TabularTransform: categorical column(s) {stray} not in the table")
        self.numeric = [c for c in self.columns if c not in self.categorical]
        for col in self.numeric:
            values = pd.to_numeric(df[col], errors="raise").astype(np.float64)
            if np.isinf(values).any():
                raise InvalidValueError(f"TabularTransform: infinite value in column {col}")
            if values.notna().sum() == 0:
                raise InvalidValueError(f"TabularTransform: column {col} has no value in the training data")
            std = float(values.std(ddof=0))
            self.mean[col] = float(values.mean())
            self.std[col] = std if std >= self.min_std else 1.0
            if values.isna().any():
                self.indicators.append(col)
        for col in self.categorical:
            self.levels[col] = sorted(set(self._levels(df[col])))
        return self

    # ------------------------------------------------------------------ federated fitting
    def moments(self, df: pd.DataFrame) -> dict[str, Any]:
        """Aggregate statistics of TRAINING rows, summable across sites (never a patient row).

        What :meth:`fit` needs, as sums: per numeric column the count, sum and sum of squares of the observed
        values and the number of missing values; per categorical column the count of each level.

        Parameters
        ----------
        df : DataFrame, shape = (n_cases, n_columns)
            The site's training rows of the table, indexed by case_id.

        Returns
        -------
        dict
            JSON-compatible: ``n_rows`` (int), ``columns`` (list of str, table order), ``numeric``
            (``{column: {"count", "sum", "sumsq", "n_missing"}}``) and ``levels`` (``{column: {level:
            count}}``, NaN counted as ``<missing>``). Combine sites with :meth:`merge_moments`, fit with
            :meth:`from_moments`.
        """
        columns = [str(c) for c in df.columns]
        stray = [c for c in self.categorical if c not in columns]
        if stray:
            raise GeneMismatchError(f"TabularTransform: categorical column(s) {stray} not in the table")
        numeric: dict[str, dict[str, float | int]] = {}
        for col in (c for c in columns if c not in self.categorical):
            values = pd.to_numeric(df[col], errors="raise").to_numpy(dtype=np.float64)
            if np.isinf(values).any():
                raise InvalidValueError(f"TabularTransform: infinite value in column {col}")
            observed = values[~np.isnan(values)]
            numeric[col] = {
                "count": int(observed.size),
                "sum": float(observed.sum()),
                "sumsq": float(np.square(observed).sum()),
                "n_missing": int(values.size - observed.size),
            }
        levels = {
            col: {str(k): int(v) for k, v in self._levels(df[col]).value_counts(sort=False).items()}
            for col in self.categorical
        }
        return {"n_rows": int(len(df)), "columns": columns, "numeric": numeric, "levels": levels}

    @staticmethod
    def merge_moments(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Sum the :meth:`moments` of several sites (same columns, same categorical columns).

        Parameters
        ----------
        parts : sequence of mappings
            One :meth:`moments` dict per training site.

        Returns
        -------
        dict
            The pooled moments, in the format of :meth:`moments`.

        Raises
        ------
        GeneMismatchError
            When the sites' tables have different columns or categorical columns.
        """
        if not parts:
            raise InvalidValueError("TabularTransform.merge_moments: no moments to merge")
        columns = list(parts[0]["columns"])
        categorical = sorted(parts[0]["levels"])
        for i, part in enumerate(parts[1:], start=1):
            if list(part["columns"]) != columns or sorted(part["levels"]) != categorical:
                raise GeneMismatchError(
                    f"TabularTransform.merge_moments: part {i} has columns {preview(part['columns'], 5)} "
                    f"(categorical {sorted(part['levels'])}), part 0 has {preview(columns, 5)} "
                    f"(categorical {categorical})"
                )
        numeric = {
            col: {
                key: sum(part["numeric"][col][key] for part in parts)
                for key in ("count", "sum", "sumsq", "n_missing")
            }
            for col in parts[0]["numeric"]
        }
        levels: dict[str, dict[str, int]] = {}
        for col in categorical:
            counts: dict[str, int] = {}
            for part in parts:
                for level, n in part["levels"][col].items():
                    counts[str(level)] = counts.get(str(level), 0) + int(n)
            levels[col] = counts
        n_rows = int(sum(int(part["n_rows"]) for part in parts))
        return {"n_rows": n_rows, "columns": columns, "numeric": numeric, "levels": levels}

    @classmethod
    def from_moments(
        cls,
        moments: Mapping[str, Any],
        *,
        categorical: Sequence[str] = (),
        standardize: bool = True,
        min_std: float = DEFAULT_MIN_STD,
    ) -> TabularTransform:
        """A fitted transform from pooled :meth:`moments` of the training sites (same result as :meth:`fit`).

        Parameters
        ----------
        moments : mapping
            :meth:`merge_moments` of the training sites (or one site's :meth:`moments`).
        categorical, standardize, min_std
            As the constructor; ``categorical`` must name the columns the moments hold levels for.

        Notes
        -----
        mean = sum / count and std = sqrt(sumsq / count - mean^2) (population) over the observed values; a
        column with a missing value at any training site gets a ``<column>__missing`` indicator; the levels
        of a categorical column are the sorted union of the sites' levels.
        """
        transform = cls(categorical, standardize=standardize, min_std=min_std)
        if sorted(moments["levels"]) != sorted(transform.categorical):
            raise GeneMismatchError(
                f"TabularTransform.from_moments: moments hold levels for {sorted(moments['levels'])}, "
                f"categorical={sorted(transform.categorical)}"
            )
        transform.columns = [str(c) for c in moments["columns"]]
        transform.numeric = [c for c in transform.columns if c not in transform.categorical]
        for col in transform.numeric:
            stats = moments["numeric"][col]
            count = int(stats["count"])
            if count == 0:
                raise InvalidValueError(f"TabularTransform: column {col} has no value in the training data")
            mean = float(stats["sum"]) / count
            std = math.sqrt(max(float(stats["sumsq"]) / count - mean * mean, 0.0))
            transform.mean[col] = mean
            transform.std[col] = std if std >= transform.min_std else 1.0
            if int(stats["n_missing"]) > 0:
                transform.indicators.append(col)
        transform.levels = {
            col: sorted(level for level, n in moments["levels"][col].items() if int(n) > 0)
            for col in transform.categorical
        }
        return transform

    @staticmethod
    def _levels(series: pd.Series) -> pd.Series:
        return series.astype(object).where(series.notna(), MISSING_LEVEL).astype(str)

    @property
    def feature_names(self) -> list[str]:
        """Output feature names, in column order."""
        names = list(self.numeric) + [f"{c}__missing" for c in self.indicators]
        names += [f"{c}={level}" for c in self.categorical for level in self.levels[c]]
        return names

    @property
    def n_features(self) -> int:
        """Number of output features F."""
        return len(self.feature_names)

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        """Encode rows with the fitted state (never refits).

        Returns
        -------
        np.ndarray
            float32, shape = (n_cases, n_features).
        """
        if self.columns is None:
            raise RuntimeError("TabularTransform.transform called before fit / load_state_dict")
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise GeneMismatchError(f"tabular table lacks the fitted column(s) {missing}")
        blocks = []
        for col in self.numeric:
            values = pd.to_numeric(df[col], errors="raise").to_numpy(dtype=np.float64)
            nan = np.isnan(values)
            if nan.any() and col not in self.indicators:
                log.warning(
                    "TabularTransform: %d NaN in column %s (none in training) imputed by the training mean",
                    int(nan.sum()),
                    col,
                )
            values = np.where(nan, self.mean[col], values)
            if self.standardize:
                values = (values - self.mean[col]) / self.std[col]
            blocks.append(values)
        for col in self.indicators:
            blocks.append(pd.to_numeric(df[col]).isna().to_numpy(dtype=np.float64))
        for col in self.categorical:
            levels = self._levels(df[col])
            unseen = ~levels.isin(self.levels[col])
            if unseen.any():
                log.warning(
                    "TabularTransform: unseen level(s) %s of column %s encoded as zeros",
                    preview(levels[unseen].unique(), 3),
                    col,
                )
            for level in self.levels[col]:
                blocks.append((levels == level).to_numpy(dtype=np.float64))
        if not blocks:
            return np.zeros((len(df), 0), dtype=np.float32)
        return np.stack(blocks, axis=1).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state."""
        return {
            "categorical": self.categorical,
            "standardize": self.standardize,
            "min_std": self.min_std,
            "columns": self.columns,
            "numeric": self.numeric,
            "mean": self.mean,
            "std": self.std,
            "indicators": self.indicators,
            "levels": self.levels,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> TabularTransform:
        """Restore a :meth:`state_dict`; returns self."""
        self.__init__(state["categorical"], state["standardize"], state.get("min_std", DEFAULT_MIN_STD))  # type: ignore[misc]
        self.columns = None if state["columns"] is None else list(state["columns"])
        self.numeric = list(state["numeric"])
        self.mean = {k: float(v) for k, v in state["mean"].items()}
        self.std = {k: float(v) for k, v in state["std"].items()}
        self.indicators = list(state["indicators"])
        self.levels = {k: list(v) for k, v in state["levels"].items()}
        return self

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> TabularTransform:
        """A new transform from a :meth:`state_dict`."""
        return cls().load_state_dict(state)


def expression_transform_for(layout: Any) -> ExpressionTransform:
    """An unfitted :class:`ExpressionTransform` with the layout's ``transform`` keys (documented defaults)."""
    return ExpressionTransform(**dict(layout.transform))


def tabular_transform_for(layout: Any) -> TabularTransform | None:
    """An unfitted :class:`TabularTransform` for a tabular strong modality (else None)."""
    if layout.strong_kind != "tabular":
        return None
    return TabularTransform(categorical=layout.tables[layout.strong].categorical, **dict(layout.tabular))
