"""From cohorts to model inputs: preprocessing fitted on training cases only, datasets and the model.

Shared by the centralized protocol (``fedprog train``), the local/pooled baselines and the Flower client, so
every path prepares data the same way. A :class:`Preprocessing` is fitted on the training cases (or built from
federated aggregates), serialized with :meth:`Preprocessing.state_dict`, and applied unchanged to every other
site: a held-out site never refits anything.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from fedprog.data import (
    Cohort,
    DatasetLayout,
    ExpressionTransform,
    GeneGroups,
    SurvivalBins,
    SurvivalDataset,
    TabularTransform,
    load_groups,
)
from fedprog.data.dataset import expression_frame
from fedprog.data.harmonize import align_expression, feature_genes, max_missing_fraction, missing_genes
from fedprog.data.site_norm import site_standardizers
from fedprog.data.transforms import expression_transform_for, tabular_transform_for
from fedprog.models import create_model
from fedprog.report import to_jsonable

log = logging.getLogger(__name__)


@dataclass
class Preprocessing:
    """Everything fitted on the training cases that the other sites must reuse unchanged."""

    groups: GeneGroups | None
    expression: ExpressionTransform | None
    strong: TabularTransform | None
    bins: SurvivalBins

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (sent to Flower clients, saved in checkpoints)."""
        return {
            "groups": None
            if self.groups is None
            else {"names": self.groups.names, "genes": self.groups.genes},
            "expression": None if self.expression is None else to_jsonable(self.expression.state_dict()),
            "strong": None if self.strong is None else to_jsonable(self.strong.state_dict()),
            "bins": self.bins.to_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Preprocessing:
        """Rebuild from :meth:`state_dict`."""
        groups = state.get("groups")
        return cls(
            groups=None
            if groups is None
            else GeneGroups(list(groups["names"]), [list(g) for g in groups["genes"]]),
            expression=None
            if state.get("expression") is None
            else ExpressionTransform.from_state_dict(state["expression"]),
            strong=None if state.get("strong") is None else TabularTransform.from_state_dict(state["strong"]),
            bins=SurvivalBins.from_dict(state["bins"]),
        )


def training_groups(layout: DatasetLayout, genes: Sequence[str]) -> GeneGroups | None:
    """The layout's gene groups restricted to the expression genes (None without expression)."""
    if layout.expression is None or layout.groups is None:
        return None
    return load_groups(layout).restrict(genes)


def training_features(
    layout: DatasetLayout, gene_lists: Mapping[str, Sequence[str]]
) -> tuple[GeneGroups | None, list[str]]:
    """Gene groups and the feature genes fixed by the TRAINING sites' gene lists (``layout.gene_policy``).

    The one place every path (train, pooled, local, the federated server) decides the features; see
    :mod:`fedprog.data.harmonize`. With groups, the features are the group genes in group order.
    """
    genes = feature_genes(gene_lists, layout.gene_policy)
    groups = training_groups(layout, genes)
    return groups, list(groups.gene_order) if groups is not None else genes


def fit_expression(
    layout: DatasetLayout, parts: Mapping[str, tuple[Cohort, Sequence[str]]]
) -> tuple[GeneGroups | None, ExpressionTransform]:
    """Fix the features on the training parts (name -> (cohort, case ids)) and fit the expression transform.

    A training part lacking feature genes (``gene_policy: union``) contributes NaN columns that count no case
    in those genes' moments; the allowed fraction is checked (``max_missing_genes_fraction``).
    """
    groups, genes = training_features(layout, {name: cohort.genes for name, (cohort, _) in parts.items()})
    frames = []
    for name, (cohort, ids) in parts.items():
        missing_genes(name, cohort.genes, genes, max_missing_fraction(layout))
        frames.append(align_expression(expression_frame(cohort, None, ids), genes))
    expression = expression_transform_for(layout).fit_parts(frames)
    log.info(
        "expression features: %d genes fixed by training %s (gene_policy=%s)",
        len(genes),
        sorted(parts),
        layout.gene_policy,
    )
    return groups, expression


def site_expression_moments(
    layout: DatasetLayout, cohort: Cohort, genes: Sequence[str], case_ids: Sequence[str], *, site: str
) -> dict[str, Any]:
    """One training site's expression moments over the server's feature ``genes`` (federated fit).

    The site's missing feature genes (``gene_policy: union``) are checked against
    ``max_missing_genes_fraction`` and count no case (``gene_count``); summing ``count``, ``gene_count``,
    ``sum`` and ``sumsq`` over the training sites and calling ``ExpressionTransform.from_moments(...,
    gene_count=...)`` gives exactly :func:`fit_expression` on the pooled cases.
    """
    missing_genes(site, cohort.genes, genes, max_missing_fraction(layout))
    frame = align_expression(expression_frame(cohort, None, case_ids), genes)
    return expression_transform_for(layout).moments(frame)


def fit_preprocessing(
    layout: DatasetLayout,
    cohorts: Mapping[str, Cohort],
    train_cases: Mapping[str, Sequence[str]],
    *,
    n_bins: int,
) -> Preprocessing:
    """Fit gene groups, expression/tabular transforms and survival bins on the training cases only.

    Parameters
    ----------
    layout : DatasetLayout
    cohorts : mapping of cohort name to Cohort
        Loaded (and gene-harmonized) cohorts.
    train_cases : mapping of cohort name to case ids
        The training cases per cohort; nothing else is looked at.
    n_bins : int
        Number of survival-time bins (quantiles of the uncensored training times).
    """
    used = {name: list(ids) for name, ids in train_cases.items() if len(ids)}
    if not used:
        raise ValueError("fit_preprocessing: no training cases")
    labels = pd.concat([cohorts[name].labels.loc[ids] for name, ids in used.items()])
    where = f"training cases of {sorted(used)}"
    bins = SurvivalBins.fit(labels["survival_months"], labels["censorship"], n_bins, where=where)

    groups, expression = None, None
    if layout.expression is not None:
        groups, expression = fit_expression(
            layout, {name: (cohorts[name], ids) for name, ids in used.items()}
        )

    strong = tabular_transform_for(layout)
    if strong is not None:
        table = pd.concat([cohorts[name].tables[str(layout.strong)].loc[ids] for name, ids in used.items()])
        strong.fit(table)
    log.info("preprocessing fitted on %d training cases of %s: bins %s", len(labels), sorted(used), bins)
    return Preprocessing(groups=groups, expression=expression, strong=strong, bins=bins)


def make_dataset(
    cohort: Cohort,
    case_ids: Sequence[str],
    prep: Preprocessing,
    *,
    max_patches: int | None = None,
    seed: int = 0,
    site: str | None = None,
    site_cases: Sequence[str] | None = None,
) -> SurvivalDataset:
    """A :class:`SurvivalDataset` of ``case_ids`` with the fitted preprocessing applied unchanged.

    Feature genes the cohort lacks are imputed at the training mean (counted in ``missing_genes``, refused
    above ``max_missing_genes_fraction``); ``site`` names the site in those messages. With the layout's
    ``site_standardize``, each hospital's bags are standardized by its own patch statistics over
    ``site_cases`` (every case the site holds; default all the cohort's cases), no labels read
    (:mod:`fedprog.data.site_norm`).
    """
    standardizers = None
    if cohort.layout.site_standardize:
        pool = list(cohort.labels.index) if site_cases is None else list(site_cases)
        standardizers = site_standardizers(cohort, [str(c) for c in case_ids], pool)
    return SurvivalDataset(
        cohort,
        case_ids,
        expression_transform=prep.expression,
        strong_transform=prep.strong,
        bins=prep.bins,
        groups=prep.groups,
        max_patches=max_patches,
        seed=seed,
        site=site,
        standardizers=standardizers,
    )


def n_outputs_for(loss: str, bins: SurvivalBins) -> int:
    """Model outputs for a loss: one logit per time bin (NLL) or a single log-risk (Cox)."""
    return 1 if loss == "cox" else bins.n_bins


def build_model(model_cfg: Mapping[str, Any], data: SurvivalDataset, *, loss: str) -> nn.Module:
    """Create the configured model for the inputs of ``data`` (group index, strong modality and width)."""
    return create_model(
        model_cfg,
        group_index=data.group_index or [],
        strong_kind=data.strong_kind or "none",
        strong_dim=data.strong_dim,
        n_outputs=n_outputs_for(loss, data.bins),
    )


class PooledDataset(SurvivalDataset):
    """Several :class:`SurvivalDataset` s (e.g. source cohorts or training sites) seen as one.

    Used for multi-source and pooled training; it exposes the attributes the engine reads (``times``,
    ``censorship``, ``bins``, ``strata``, train/eval modes, model input shapes).
    """

    def __init__(self, parts: Sequence[SurvivalDataset]) -> None:  # noqa: D107 - documented above
        if not parts:
            raise ValueError("PooledDataset needs at least one dataset")
        kinds = {p.strong_kind for p in parts}
        genes = {tuple(p.genes) for p in parts}
        if len(kinds) > 1 or len(genes) > 1:
            raise ValueError("PooledDataset: parts differ in strong modality or expression genes")
        self.parts = list(parts)
        self.bins = parts[0].bins
        self.groups = parts[0].groups
        self.genes = parts[0].genes
        self.group_index = parts[0].group_index
        self.strong_kind = parts[0].strong_kind
        self.case_ids = [c for p in parts for c in p.case_ids]
        self.times = np.concatenate([p.times for p in parts])
        self.censorship = np.concatenate([p.censorship for p in parts])
        self.bin_labels = np.concatenate([p.bin_labels for p in parts])
        self._offsets = np.cumsum([0] + [len(p) for p in parts])
        self._source_of: dict[str, int] | None = None  # case id -> part, built on first use
        self.training = parts[0].training

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def n_sources(self) -> int:
        """One source per part (a source cohort, or a training site)."""
        return len(self.parts)

    def source_index(self, case_ids: Sequence[str]) -> np.ndarray:
        """Index of the part each case comes from; ``ValueError`` names an unknown or ambiguous case id."""
        if self._source_of is None:
            source_of: dict[str, int] = {}
            for index, part in enumerate(self.parts):
                for case in part.case_ids:
                    if source_of.setdefault(case, index) != index:
                        raise ValueError(f"case {case!r} is in two pooled sources; sources must be disjoint")
            self._source_of = source_of
        unknown = [c for c in case_ids if c not in self._source_of]
        if unknown:
            raise ValueError(f"case(s) {unknown[:3]} are not in this pooled dataset")
        return np.asarray([self._source_of[c] for c in case_ids], dtype=np.int64)

    def __getitem__(self, index: int):  # noqa: D105
        part = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self.parts[part][index - int(self._offsets[part])]

    def train(self, mode: bool = True) -> PooledDataset:
        """Set training mode on every part; returns self."""
        self.training = mode
        for part in self.parts:
            part.train(mode)
        return self

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to every part (patch re-sampling)."""
        for part in self.parts:
            part.set_epoch(epoch)

    @property
    def strong_dim(self) -> int:
        """Feature width of the strong modality."""
        return self.parts[0].strong_dim

    def __repr__(self) -> str:
        return f"PooledDataset({len(self.parts)} parts, cases={len(self)}, events={self.n_events})"
