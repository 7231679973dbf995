"""Torch dataset of one site's cases: ``Sample`` per case, ``collate`` into a padded, masked ``Batch``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedprog.data.bags import read_case_bags
from fedprog.data.bins import SurvivalBins
from fedprog.data.cohort import CENSOR, TIME, Cohort
from fedprog.data.errors import CohortError, GeneMismatchError, preview
from fedprog.data.groups import GeneGroups
from fedprog.data.harmonize import align_expression, max_missing_fraction, missing_genes
from fedprog.data.site_norm import ChannelStats, standardize_bag
from fedprog.data.transforms import ExpressionTransform, TabularTransform

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One case.

    Attributes
    ----------
    case_id : str
    expression : Tensor
        float32, shape = (n_genes,), transformed, columns in ``GeneGroups.gene_order`` (empty: no expression).
    strong : Tensor
        float32, shape = (N, F): WSI bag (N patches x F features) or tabular features as (F, 1).
    bin : int
        Survival-time bin (0..n_bins-1).
    time : float
        Survival time, months.
    censorship : float
        1 = censored, 0 = event.
    """

    case_id: str
    expression: Tensor
    strong: Tensor
    bin: int
    time: float
    censorship: float


@dataclass
class Batch:
    """A collated batch (architecture section 2).

    Attributes
    ----------
    case_ids : list of str
    expression : Tensor, float32, shape = (B, n_genes)
    strong : Tensor, float32, shape = (B, N, F) (zero-padded along N)
    strong_mask : Tensor, bool, shape = (B, N), True = real token
    bins : Tensor, int64, shape = (B,)
    time : Tensor, float32, shape = (B,), months
    censorship : Tensor, float32, shape = (B,), 1 = censored
    """

    case_ids: list[str]
    expression: Tensor
    strong: Tensor
    strong_mask: Tensor
    bins: Tensor
    time: Tensor
    censorship: Tensor

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        moved = {
            f.name: (value.to(device) if isinstance(value, Tensor) else value)
            for f in fields(self)
            for value in [getattr(self, f.name)]
        }
        return Batch(**moved)

    def __len__(self) -> int:
        return len(self.case_ids)


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a :class:`Batch`, zero-padding ``strong`` and building ``strong_mask``."""
    if not samples:
        raise ValueError("collate: empty list of samples")
    dims = {s.strong.shape[1] for s in samples}
    if len(dims) > 1:
        raise CohortError(
            f"collate: strong features of differing width {sorted(dims)} in one batch "
            f"(cases {preview([s.case_id for s in samples])})"
        )
    n_max = max(s.strong.shape[0] for s in samples)
    width = dims.pop()
    strong = torch.zeros((len(samples), n_max, width), dtype=torch.float32)
    mask = torch.zeros((len(samples), n_max), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s.strong.shape[0]
        strong[i, :n] = s.strong
        mask[i, :n] = True
    return Batch(
        case_ids=[s.case_id for s in samples],
        expression=torch.stack([s.expression for s in samples]),
        strong=strong,
        strong_mask=mask,
        bins=torch.tensor([s.bin for s in samples], dtype=torch.long),
        time=torch.tensor([s.time for s in samples], dtype=torch.float32),
        censorship=torch.tensor([s.censorship for s in samples], dtype=torch.float32),
    )


def expression_frame(
    cohort: Cohort, groups: GeneGroups | None = None, case_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    """The expression table of ``case_ids`` (default all), restricted to ``groups.gene_order`` when given.

    This is what an :class:`ExpressionTransform` should be fitted on (training sites only).
    """
    expr = cohort.layout.expression
    if expr is None or expr not in cohort.tables:
        raise CohortError(f"cohort {cohort.name!r}: the layout has no expression table")
    table = cohort.tables[expr]
    if case_ids is not None:
        table = table.loc[list(case_ids)]
    if groups is None:
        return table
    missing = [g for g in groups.gene_order if g not in table.columns]
    if missing:
        raise GeneMismatchError(f"cohort {cohort.name!r}: expression lacks group gene(s) {preview(missing)}")
    return table[groups.gene_order]


class SurvivalDataset(Dataset[Sample]):
    """Cases of one cohort (a site), with fitted transforms and bins applied unchanged.

    Parameters
    ----------
    cohort : Cohort
    case_ids : sequence of str
        The cases (a site's ids); every id must be in ``cohort.labels``.
    expression_transform : ExpressionTransform or None
        Fitted on the training sites (None: raw values).
    strong_transform : TabularTransform or None
        Fitted on the training sites; required for a tabular strong modality.
    bins : SurvivalBins
        Fitted on the training sites.
    groups : GeneGroups or None
        Restricted gene groups; expression columns follow ``groups.gene_order``.
    max_patches : int or None
        In training mode, at most this many patches per case (seeded random subset without replacement).
    seed : int
        Seed of the patch sampling (combined with the epoch, see :meth:`set_epoch`, and the index).
    training : bool
        Start in training mode (see :meth:`train` / :meth:`eval`).
    site : str, optional
        Site name used in messages and the missing-gene report (default: the cohort's name).
    standardizers : mapping of str to ChannelStats, optional
        Case id -> its site's patch-feature statistics; each WSI bag is standardized with them
        (:mod:`fedprog.data.site_norm`). None: bags as read.

    Attributes
    ----------
    missing_genes : list of str
        Feature genes this cohort lacks, imputed at the training mean (see :mod:`fedprog.data.harmonize`).
    """

    def __init__(
        self,
        cohort: Cohort,
        case_ids: Sequence[str],
        *,
        expression_transform: ExpressionTransform | None,
        strong_transform: TabularTransform | None,
        bins: SurvivalBins,
        groups: GeneGroups | None,
        max_patches: int | None = None,
        seed: int = 0,
        training: bool = False,
        site: str | None = None,
        standardizers: Mapping[str, ChannelStats] | None = None,
    ) -> None:
        self.cohort = cohort
        self.site = site
        self.standardizers = standardizers
        self.case_ids = [str(c) for c in case_ids]
        unknown = [c for c in self.case_ids if c not in cohort.labels.index]
        if unknown:
            raise CohortError(
                f"cohort {cohort.name!r}: case(s) {preview(unknown)} not loaded (dropped or absent)"
            )
        if not self.case_ids:
            raise CohortError(f"cohort {cohort.name!r}: a dataset needs at least one case")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be >= 1 or None, got {max_patches}")
        self.bins = bins
        self.groups = groups
        self.max_patches = max_patches
        self.seed = int(seed)
        self.training = bool(training)
        self.epoch = 0
        self.expression_transform = expression_transform
        self.strong_transform = strong_transform
        labels = cohort.labels.loc[self.case_ids]
        self.times = labels[TIME].to_numpy(dtype=np.float64)
        self.censorship = labels[CENSOR].to_numpy(dtype=np.float64)
        self.bin_labels = bins.transform(self.times)
        self.genes, self._expression = self._prepare_expression()
        self.group_index = groups.indices(self.genes) if groups is not None else None
        self.strong_kind = cohort.layout.strong_kind
        self._strong_table: np.ndarray | None = None
        self._bag_dim: int | None = None
        if self.strong_kind == "tabular":
            if strong_transform is None:
                raise CohortError(
                    f"cohort {cohort.name!r}: strong={cohort.layout.strong!r} is tabular and needs a "
                    "fitted TabularTransform (strong_transform)"
                )
            self._strong_table = strong_transform.transform(
                cohort.tables[str(cohort.layout.strong)].loc[self.case_ids]
            )
        elif self.strong_kind == "wsi":
            lacking = [c for c in self.case_ids if c not in cohort.bag_paths]
            if lacking:
                raise CohortError(f"cohort {cohort.name!r}: no bag file for case(s) {preview(lacking)}")

    def _prepare_expression(self) -> tuple[list[str], np.ndarray]:
        """Features in training order: the group genes, else the transform's genes, else the table's.

        Genes the cohort lacks are imputed at the training mean up to the layout's
        ``max_missing_genes_fraction`` (:mod:`fedprog.data.harmonize`); their names are kept in
        ``self.missing_genes``.
        """
        self.missing_genes: list[str] = []
        if self.cohort.layout.expression is None:
            return [], np.zeros((len(self.case_ids), 0), dtype=np.float32)
        frame = expression_frame(self.cohort, None, self.case_ids)
        fitted = None if self.expression_transform is None else self.expression_transform.genes
        if self.groups is not None:
            genes = list(self.groups.gene_order)
        else:
            genes = list(fitted) if fitted else [str(g) for g in frame.columns]
        where = f"cohort {self.cohort.name!r}" if self.site is None else f"site {self.site!r}"
        if fitted:
            lacking = [g for g in genes if g not in set(fitted)]
            if lacking:
                raise GeneMismatchError(
                    f"{where}: the expression transform was not fitted on gene(s) {preview(lacking)}"
                )
        name = self.site or self.cohort.name
        self.missing_genes = missing_genes(
            name, frame.columns, genes, max_missing_fraction(self.cohort.layout)
        )
        if self.expression_transform is None:
            log.info("%s: no expression transform given, using raw expression values", where)
            return genes, align_expression(frame, genes).fillna(0.0).to_numpy(dtype=np.float32)
        try:
            values = self.expression_transform.transform(frame, impute_missing=True)
        except CohortError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        order = fitted or genes
        position = {g: i for i, g in enumerate(order)}
        return genes, values[:, [position[g] for g in genes]]

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> SurvivalDataset:
        """Training mode: sample at most ``max_patches`` patches per case; returns self."""
        self.training = mode
        return self

    def eval(self) -> SurvivalDataset:
        """Evaluation mode: all patches; returns self."""
        return self.train(False)

    def set_epoch(self, epoch: int) -> None:
        """Change the patch sampling between epochs (deterministic given seed, epoch and index)."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.case_ids)

    def _strong(self, index: int) -> Tensor:
        if self.strong_kind == "tabular":
            assert self._strong_table is not None
            return torch.from_numpy(self._strong_table[index]).unsqueeze(1)  # (F, 1)
        if self.strong_kind is None:
            return torch.zeros((0, 1), dtype=torch.float32)
        case = self.case_ids[index]
        bag = read_case_bags(
            self.cohort.bag_paths[case],
            case_id=case,
            cohort=self.cohort.name,
            dim=self._bag_dim,
            min_patches=self.cohort.layout.min_patches,
        )
        self._bag_dim = int(bag.shape[1])
        if self.standardizers is not None:
            bag = self.standardizers[case].apply(bag)
        elif self.cohort.layout.bag_standardize:  # over the whole bag: training and evaluation alike
            bag = standardize_bag(bag)
        if self.training and self.max_patches is not None and bag.shape[0] > self.max_patches:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            keep = np.sort(rng.choice(bag.shape[0], size=self.max_patches, replace=False))
            bag = bag[torch.from_numpy(keep)]
        return bag

    def __getitem__(self, index: int) -> Sample:
        return Sample(
            case_id=self.case_ids[index],
            expression=torch.from_numpy(self._expression[index]),
            strong=self._strong(index),
            bin=int(self.bin_labels[index]),
            time=float(self.times[index]),
            censorship=float(self.censorship[index]),
        )

    # ------------------------------------------------------------------ summaries
    def strata(self) -> np.ndarray:
        """Sampling stratum per case, ``bin * 2 + censorship`` (the 2 x n_bins (bin, censorship) classes).

        Returns
        -------
        np.ndarray
            int64, shape = (n_cases,).
        """
        return self.bin_labels * 2 + self.censorship.astype(np.int64)

    @property
    def n_events(self) -> int:
        """Number of uncensored cases."""
        return int((self.censorship == 0).sum())

    @property
    def n_sources(self) -> int:
        """Sources (cohorts or sites) pooled in this dataset: one (see ``PooledDataset``)."""
        return 1

    def source_index(self, case_ids: Sequence[str]) -> np.ndarray:
        """Index of each case's source among :attr:`n_sources` (int64, all 0 for one cohort)."""
        return np.zeros(len(case_ids), dtype=np.int64)

    @property
    def strong_dim(self) -> int:
        """Feature width F of ``strong`` (reads one bag for WSI)."""
        if self.strong_kind == "tabular":
            assert self._strong_table is not None
            return int(self._strong_table.shape[1])
        if self.strong_kind is None:
            return 1
        if self._bag_dim is None:
            self._strong(0)
        assert self._bag_dim is not None
        return self._bag_dim

    def __repr__(self) -> str:
        return (
            f"SurvivalDataset(cohort={self.cohort.name!r}, cases={len(self)}, events={self.n_events}, "
            f"genes={len(self.genes)}, strong={self.strong_kind})"
        )
