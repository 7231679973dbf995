"""FLamby's Fed-TCGA-BRCA (``<shared>/data/fed_tcga_brca``) as a fedprog cohort (tabular strong modality).

Mapping to our model (layout ``format: fed_tcga_brca``, ``configs/data/fed_tcga_brca.yaml``):

- case_id = ``pid``; survival_months = ``T`` (days) / 30.4375 (the mean Gregorian month), so every cohort of
  fedprog shares one unit; the C-index and the quantile bins do not depend on the unit. The raw days
  are kept in the labels column ``days``.
- censorship = 1 - ``E`` (``E`` = 1 means death observed).
- site = the FLamby region of the case's TSS (``centers.csv``), center = client k of ``train_test_split.csv``
  (``fold2`` = ``train_k`` / ``test_k``), split = ``train`` / ``test``; the region <-> k match is checked.
- The 39 integer features form the table named by the layout's ``strong`` key (tabular strong modality).
- The 8 patients of region "Other" are absent from the split file; they are dropped and reported.
- Zero follow-up times (12 censored cases at day 0, in FLamby's benchmark) are kept so that the split sizes
  match FLamby (866 train / 222 test); negative times are an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from fedprog.data.cohort import (
    CENSOR,
    COHORT,
    SITE,
    TIME,
    Cohort,
    numeric_columns,
    read_table_file,
    require_cohort,
    require_columns,
    tss_code,
)
from fedprog.data.errors import (
    CohortError,
    DuplicateCaseError,
    InvalidValueError,
    preview,
)
from fedprog.data.layout import DAYS_PER_MONTH, DatasetLayout

log = logging.getLogger(__name__)

DATA_FILE = "brca.csv"
CENTERS_FILE = "centers.csv"
SPLIT_FILE = "train_test_split.csv"
ID, EVENT, DAYS = "pid", "E", "T"
CENTER_TSS, CENTER_REGION = "TSS Code", "Region"
SPLIT_FOLD = "fold2"


def load_flamby_cohort(layout: DatasetLayout, cohort: str) -> Cohort:
    """Load Fed-TCGA-BRCA from ``layout.root`` as one cohort (see the module docstring for the mapping).

    Returns
    -------
    Cohort
        labels: survival_months, censorship, site (region), cohort, days, center (int 0..5), split, tss;
        tables: {layout.strong: the 39 features as float64}; no bags.
    """
    require_cohort(layout, cohort)
    data_path = layout.root / DATA_FILE
    data, outcome = _read_data(data_path)
    table_name = layout.strong if layout.strong_kind == "tabular" else "clinical"
    spec = layout.tables.get(str(table_name))
    columns = (
        list(spec.parts[0].columns)
        if spec is not None and spec.parts[0].columns
        else [c for c in data.columns if c not in (EVENT, DAYS)]
    )
    require_columns(data, columns, data_path)
    features = numeric_columns(data, columns, data_path)
    split = _read_split(layout.root / SPLIT_FILE, data.index, data_path)
    tss, region = _regions(layout.root / CENTERS_FILE, data.index)

    dropped = [
        (c, f"not in {SPLIT_FILE} (TSS {tss[c]}, region {region.get(c, '?')})")
        for c in data.index.difference(split.index)
    ]
    keep = [c for c in data.index if c in split.index]
    _check_regions(region, split, keep, layout.root)
    labels = pd.DataFrame(
        {
            TIME: outcome.loc[keep, DAYS].to_numpy() / DAYS_PER_MONTH,
            CENSOR: (1 - outcome.loc[keep, EVENT].to_numpy()).astype(np.int64),
            SITE: region[keep].to_numpy(),
            COHORT: cohort,
            "days": outcome.loc[keep, DAYS].to_numpy(),
            "center": split.loc[keep, "center"].to_numpy(),
            "split": split.loc[keep, "split"].to_numpy(),
            "tss": tss[keep].to_numpy(),
        },
        index=pd.Index(keep, name="case_id"),
    )
    n_zero = int((labels["days"] == 0).sum())
    if n_zero:
        log.info("%s: %d case(s) with zero follow-up kept (as in FLamby)", data_path, n_zero)
    if dropped:
        log.warning(
            "%s: dropped %d case(s) absent from %s: %s",
            data_path,
            len(dropped),
            SPLIT_FILE,
            preview(c for c, _ in dropped),
        )
    frame = pd.DataFrame(dropped, columns=["case_id", "reason"])
    return Cohort(cohort, labels, {str(table_name): features.loc[keep]}, {}, frame, layout)


def _read_data(data_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``brca.csv`` indexed by case id, and its checked outcome columns (``E`` in {0, 1}, ``T`` >= 0)."""
    data = read_table_file(data_path)
    require_columns(data, [ID, EVENT, DAYS], data_path)
    data[ID] = data[ID].astype(str).str.strip()
    if data[ID].duplicated().any():
        raise DuplicateCaseError(
            f"file {data_path}, column {ID}: duplicate id(s) {preview(data.loc[data[ID].duplicated(), ID])}"
        )
    data = data.set_index(ID)
    data.index.name = "case_id"
    outcome = numeric_columns(data, [EVENT, DAYS], data_path)
    if (outcome[DAYS] < 0).any():
        bad = outcome.index[outcome[DAYS] < 0]
        raise InvalidValueError(f"file {data_path}, column {DAYS}: negative time for case(s) {preview(bad)}")
    if not outcome[EVENT].isin([0.0, 1.0]).all():
        bad = outcome.index[~outcome[EVENT].isin([0.0, 1.0])]
        raise InvalidValueError(
            f"file {data_path}, column {EVENT}: event indicator not in {{0, 1}} for case(s) {preview(bad)}"
        )
    return data, outcome


def _read_split(split_path: Path, case_ids: pd.Index, data_path: Path) -> pd.DataFrame:
    """``train_test_split.csv`` as columns ``split`` (train/test) and ``center`` (k) indexed by case id."""
    split = read_table_file(split_path)
    require_columns(split, [ID, SPLIT_FOLD], split_path)
    parsed = split[SPLIT_FOLD].astype(str).str.extract(r"^(train|test)_(\d+)$")
    if parsed.isna().any().any():
        bad = split.loc[parsed.isna().any(axis=1), ID]
        raise InvalidValueError(
            f"file {split_path}, column {SPLIT_FOLD}: expected train_k/test_k for id(s) {preview(bad)}"
        )
    split = pd.DataFrame(
        {"split": parsed[0].to_numpy(), "center": parsed[1].astype(int).to_numpy()},
        index=split[ID].astype(str).str.strip(),
    )
    if split.index.duplicated().any():
        raise DuplicateCaseError(
            f"file {split_path}: duplicate id(s) {preview(split.index[split.index.duplicated()])}"
        )
    unknown = split.index.difference(case_ids)
    if len(unknown):
        raise CohortError(f"file {split_path}: id(s) {preview(unknown)} are not in {data_path}")
    return split


def _regions(centers_path: Path, case_ids: pd.Index) -> tuple[pd.Series, pd.Series]:
    """Each case's TSS code and its FLamby region from ``centers.csv`` (NaN where the TSS is not listed)."""
    centers = read_table_file(centers_path)
    require_columns(centers, [CENTER_TSS, CENTER_REGION], centers_path)
    region_of = dict(
        zip(centers[CENTER_TSS].astype(str).str.strip(), centers[CENTER_REGION].astype(str), strict=True)
    )
    tss = pd.Series([tss_code(c) or "" for c in case_ids], index=case_ids)
    return tss, tss.map(region_of)


def _check_regions(region: pd.Series, split: pd.DataFrame, keep: list[str], root: Path) -> None:
    """Every kept case has a region, and regions match the split's centers one to one."""
    centers_path, split_path = root / CENTERS_FILE, root / SPLIT_FILE
    unmapped = [c for c in keep if pd.isna(region[c])]
    if unmapped:
        raise CohortError(f"file {centers_path}: no region for the TSS of case(s) {preview(unmapped)}")
    pairs = pd.crosstab(region[keep], split.loc[keep, "center"])
    if ((pairs > 0).sum(axis=0) != 1).any() or ((pairs > 0).sum(axis=1) != 1).any():
        raise CohortError(
            f"{split_path} centers and {centers_path} regions do not correspond one to one:\n{pairs}"
        )
