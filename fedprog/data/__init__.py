"""Data layer: on-disk cohort format, validation, transforms, survival bins, sites, torch dataset."""

from __future__ import annotations

from fedprog.data.bins import SurvivalBins
from fedprog.data.check import DatasetSummary, check_dataset
from fedprog.data.cohort import Cohort, load_cohort, load_cohorts
from fedprog.data.dataset import Batch, Sample, SurvivalDataset, collate, expression_frame
from fedprog.data.errors import (
    BagError,
    CohortError,
    DuplicateCaseError,
    GeneMismatchError,
    GroupError,
    InvalidValueError,
    LayoutError,
    MissingColumnError,
    MissingFeaturesError,
    SiteError,
)
from fedprog.data.groups import GeneGroups, load_groups
from fedprog.data.layout import DatasetLayout, GroupSpec, TablePart, TableSpec
from fedprog.data.sites import Site, build_sites, tss_counts
from fedprog.data.transforms import (
    ExpressionTransform,
    TabularTransform,
    expression_transform_for,
    tabular_transform_for,
)

__all__ = [
    "BagError",
    "Batch",
    "Cohort",
    "CohortError",
    "DatasetLayout",
    "DatasetSummary",
    "DuplicateCaseError",
    "ExpressionTransform",
    "GeneGroups",
    "GeneMismatchError",
    "GroupError",
    "GroupSpec",
    "InvalidValueError",
    "LayoutError",
    "MissingColumnError",
    "MissingFeaturesError",
    "Sample",
    "Site",
    "SiteError",
    "SurvivalBins",
    "SurvivalDataset",
    "TablePart",
    "TableSpec",
    "TabularTransform",
    "build_sites",
    "check_dataset",
    "collate",
    "expression_frame",
    "expression_transform_for",
    "load_cohort",
    "load_cohorts",
    "load_groups",
    "tabular_transform_for",
    "tss_counts",
]
