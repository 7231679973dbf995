"""Partition cohorts into hospitals (``Site``): per cohort, per site column, per TSS, or from a mapping.

Partitions (``federation`` config, ``sites/federation/*.yaml``)
---------------------------------------------------------------
``cohort``
    One site per cohort, named after it.
``site``
    One site per value of the labels' ``site`` column (``site_column``), named ``<cohort>-<value>``.
``tss``
    One site per tissue source site (barcode characters 6-7) within each cohort, named ``<cohort>-<TSS>``.
    Merging rule: every TSS with fewer than ``min_cases`` cases or ``min_events`` events joins
    ``<cohort>-other``; if that pooled site itself falls short, it joins the largest TSS site instead (which
    keeps its name). If no TSS reaches both, the whole cohort is one site ``<cohort>-other``.
``mapping``
    A CSV maps a case id or a TSS code to a site (FLamby's regional centers): ``mapping: {path, key: case|tss,
    key_column, site_column}``. Sites are named ``<value>`` (one cohort) or ``<cohort>-<value>``.
    Cases whose key is not in the file are left out with a warning (``unmapped: drop``) or raise
    (``unmapped: error``).

Roles: a site whose name or cohort is in ``heldout`` is ``holdout`` (evaluation only); others ``train``.
An optional ``split_column`` (labels column, e.g. FLamby's ``split``) puts rows whose value is ``test_value``
(default ``test``) into ``Site.test_ids`` instead of ``case_ids``. Without one, ``val_fraction`` (0 < f < 1)
holds back that share of every TRAINING site's cases as its local validation split (``test_ids``, drawn per
site with ``val_seed``, stratified by event): the site trains on the rest and evaluates on it, so the
training sites' C-index is a source-validation score for model selection (never a target's).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fedprog.data.cohort import CENSOR, SITE, Cohort, load_cohort, read_table_file, tss_code
from fedprog.data.errors import SiteError, preview
from fedprog.data.layout import DatasetLayout

log = logging.getLogger(__name__)

ROLES = ("train", "holdout")
PARTITIONS = ("cohort", "site", "tss", "mapping")
OTHER = "other"
DEFAULT_MIN_CASES = 20
DEFAULT_MIN_EVENTS = 0


@dataclass(frozen=True)
class Site:
    """A hospital: a subset of one cohort's cases.

    Attributes
    ----------
    name : str
    cohort : str
    role : {"train", "holdout"}
    case_ids : tuple of str
        The site's cases (its local training cases when ``test_ids`` is set).
    test_ids : tuple of str
        Local test cases of a static split (FLamby), else empty.
    """

    name: str
    cohort: str
    role: str
    case_ids: tuple[str, ...]
    test_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise SiteError(f"site {self.name!r}: role {self.role!r} is not one of {list(ROLES)}")
        if not self.case_ids and not self.test_ids:
            raise SiteError(f"site {self.name!r} (cohort {self.cohort}) has no case")

    @property
    def all_ids(self) -> tuple[str, ...]:
        """Training and test cases together."""
        return self.case_ids + self.test_ids

    def load_cohort(self, layout: DatasetLayout) -> Cohort:
        """Load this site's cohort."""
        return load_cohort(layout, self.cohort)


def _plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def build_sites(
    layout: DatasetLayout,
    federation_cfg: Mapping[str, Any] | DictConfig | None = None,
    heldout: Iterable[str] | None = None,
    *,
    cohorts: Mapping[str, Cohort] | None = None,
) -> list[Site]:
    """Partition the layout's cohorts into sites (see the module docstring for the partitions and roles).

    Parameters
    ----------
    layout : DatasetLayout
    federation_cfg : mapping
        ``partition`` (default ``cohort``), ``min_cases`` (tss, default 20), ``min_events`` (tss, default 0),
        ``mapping`` (mapping),
        ``cohorts`` (subset to use, default all), ``split_column``, ``test_value``, ``val_fraction``,
        ``val_seed``, ``heldout``.
    heldout : iterable of str, optional
        Site or cohort names evaluated only (overrides ``federation_cfg.heldout``).
    cohorts : mapping of str to Cohort, optional
        Already loaded cohorts (loaded here otherwise).
    """
    cfg = _plain(federation_cfg)
    partition = str(cfg.get("partition") or "cohort")
    if partition not in PARTITIONS:
        raise SiteError(
            f"federation {cfg.get('name', '?')!r}: partition {partition!r} is not one of {list(PARTITIONS)}"
        )
    names = list(cfg.get("cohorts") or layout.cohorts)
    stray = [c for c in names if c not in layout.cohorts]
    if stray:
        raise SiteError(f"federation: cohort(s) {stray} not in the dataset's cohorts {list(layout.cohorts)}")
    loaded = {
        name: (cohorts[name] if cohorts and name in cohorts else load_cohort(layout, name)) for name in names
    }
    groups: list[tuple[str, str, list[str]]] = []  # (site name, cohort, case ids)
    for name, cohort in loaded.items():
        labels = cohort.labels
        if partition == "cohort":
            groups.append((name, name, list(labels.index)))
        elif partition == "site":
            for value, ids in labels.groupby(SITE, sort=True).groups.items():
                groups.append((f"{name}-{value}", name, list(ids)))
        elif partition == "tss":
            min_cases = int(cfg.get("min_cases", DEFAULT_MIN_CASES))
            groups.extend(_tss_sites(cohort, min_cases, int(cfg.get("min_events", DEFAULT_MIN_EVENTS))))
        else:
            groups.extend(_mapped_sites(cohort, cfg, single=len(loaded) == 1, layout=layout))
    held = list(cfg.get("heldout") or []) if heldout is None else list(heldout)
    known = {g[0] for g in groups} | set(names)
    unknown = [h for h in held if h not in known]
    if unknown:
        raise SiteError(
            f"heldout name(s) {unknown} are neither a site nor a cohort (sites: {preview(sorted(known), 12)})"
        )
    split_column = cfg.get("split_column")
    test_value = str(cfg.get("test_value", "test"))
    checked_val_fraction(cfg.get("val_fraction"), split_column)  # before any split is drawn
    sites = []
    for site_name, cohort_name, ids in groups:
        role = "holdout" if site_name in held or cohort_name in held else "train"
        test_ids: list[str] = []
        if split_column:
            labels = loaded[cohort_name].labels
            if split_column not in labels.columns:
                raise SiteError(
                    f"cohort {cohort_name!r}: split_column {split_column!r} is not a labels column"
                )
            is_test = labels.loc[ids, split_column].astype(str) == test_value
            test_ids = [c for c, t in zip(ids, is_test, strict=True) if t]
            ids = [c for c, t in zip(ids, is_test, strict=True) if not t]
        site = Site(site_name, cohort_name, role, tuple(ids), tuple(test_ids))
        sites.append(held_back_validation(site, loaded[cohort_name].labels, cfg))
    log.info(
        "federation (%s): %d site(s): %s",
        partition,
        len(sites),
        ", ".join(f"{s.name}[{s.role}, {len(s.all_ids)}]" for s in sites),
    )
    return sites


def checked_val_fraction(value: Any, split_column: Any, key: str = "federation.val_fraction") -> float:
    """``value`` as a validation share: 0.0 when unset (no split), else a share in (0, 1) that cannot sit
    beside a static ``split_column``; :class:`SiteError` (one line naming ``key``) otherwise."""
    if not value:
        return 0.0
    fraction = float(value)
    if not 0.0 < fraction < 1.0:
        raise SiteError(f"{key}={value!r}: choose a share in (0, 1), or null for none")
    if split_column:
        raise SiteError(
            f"{key}={value!r} with split_column={split_column!r}: the federation's static split is the "
            "sites' test split already; drop one of the two"
        )
    return fraction


def held_back_validation(site: Site, labels: pd.DataFrame, federation_cfg: Mapping[str, Any]) -> Site:
    """``site`` with ``federation_cfg.val_fraction`` of its cases as its validation split (``test_ids``);
    unchanged for a held-out site, a site with a static test split, or without ``val_fraction``."""
    fraction = checked_val_fraction(federation_cfg.get("val_fraction"), federation_cfg.get("split_column"))
    if not fraction or site.role != "train" or site.test_ids:
        return site
    censored = labels.loc[list(site.case_ids), CENSOR].to_numpy()
    seed = int(federation_cfg.get("val_seed") or 0)
    train, held = validation_split(site.name, site.case_ids, censored, fraction, seed)
    return Site(site.name, site.cohort, site.role, tuple(train), tuple(held))


def validation_split(
    site: str, ids: Sequence[str], censored: np.ndarray, fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of one site: ``fraction`` of its events and of its censored cases,
    drawn with a generator seeded by (``seed``, site name), so that every process draws the same split."""
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    held: set[str] = set()
    for stratum in (censored == 0, censored != 0):
        members = [c for c, keep in zip(ids, stratum, strict=True) if keep]
        n_val = int(round(fraction * len(members)))
        held.update(members[i] for i in rng.permutation(len(members))[:n_val])
    train = [c for c in ids if c not in held]
    if not train or not held:
        raise SiteError(
            f"site {site!r}: val_fraction={fraction} of its {len(ids)} case(s) leaves "
            f"{'no training' if not train else 'no validation'} case; lower or raise federation.val_fraction"
        )
    return train, [c for c in ids if c in held]


def tss_counts(cohort: Cohort) -> pd.Series:
    """Cases per tissue source site (barcode characters 6-7), largest first."""
    codes = pd.Series([tss_code(c) for c in cohort.labels.index], index=cohort.labels.index)
    if codes.isna().any():
        raise SiteError(
            f"cohort {cohort.name!r}: no TSS code in case id(s) {preview(codes.index[codes.isna()])}"
        )
    counts = codes.value_counts()
    return counts.sort_values(ascending=False, kind="stable")


def _tss_sites(cohort: Cohort, min_cases: int, min_events: int) -> list[tuple[str, str, list[str]]]:
    codes = pd.Series([tss_code(c) for c in cohort.labels.index], index=cohort.labels.index)
    events = cohort.labels[CENSOR] == 0

    def enough(ids: pd.Index) -> bool:
        return len(ids) >= min_cases and int(events.loc[ids].sum()) >= min_events

    order = list(tss_counts(cohort).index)  # largest first
    big = [code for code in order if enough(codes.index[codes == code])]
    sites = {f"{cohort.name}-{code}": list(codes.index[codes == code]) for code in big}
    other = codes.index[~codes.isin(big)]
    if len(other):
        if enough(other) or not sites:
            sites[f"{cohort.name}-{OTHER}"] = list(other)
        else:
            largest = f"{cohort.name}-{big[0]}"
            log.info(
                "cohort %s: %d case(s) of small TSS (< %d cases or < %d events) joined the largest site %s",
                cohort.name,
                len(other),
                min_cases,
                min_events,
                largest,
            )
            sites[largest] = sites[largest] + list(other)
    return [(name, cohort.name, ids) for name, ids in sites.items()]


def _mapped_sites(
    cohort: Cohort, cfg: Mapping[str, Any], *, single: bool, layout: DatasetLayout
) -> list[tuple[str, str, list[str]]]:
    spec = cfg.get("mapping") or {}
    if not spec.get("path"):
        raise SiteError("federation partition 'mapping' needs mapping.path (a CSV of key -> site)")
    path = layout.root_file(str(spec["path"]))
    key = str(spec.get("key", "case"))
    if key not in ("case", "tss"):
        raise SiteError(f"{path}: mapping.key {key!r} is not case | tss")
    key_column = str(spec.get("key_column", "case_id" if key == "case" else "tss"))
    site_column = str(spec.get("site_column", "site"))
    frame = read_table_file(path)
    missing = [c for c in (key_column, site_column) if c not in frame.columns]
    if missing:
        raise SiteError(
            f"mapping file {path}: missing column(s) {missing} (found {preview(frame.columns, 8)})"
        )
    keys = frame[key_column].astype(str).str.strip()
    if keys.duplicated().any():
        raise SiteError(
            f"mapping file {path}, column {key_column}: duplicate key(s) {preview(keys[keys.duplicated()])}"
        )
    table = dict(zip(keys, frame[site_column].astype(str).str.strip(), strict=True))
    case_keys = [c if key == "case" else (tss_code(c) or "") for c in cohort.labels.index]
    assigned = pd.Series([table.get(k) for k in case_keys], index=cohort.labels.index)
    unmapped = assigned.index[assigned.isna()]
    if len(unmapped):
        message = (
            f"mapping file {path}: {len(unmapped)} case(s) of cohort {cohort.name!r} unmapped: "
            f"{preview(unmapped)}"
        )
        if str(spec.get("unmapped", "drop")) == "error":
            raise SiteError(message)
        log.warning("%s; left out of the federation", message)
    exclude = {str(v) for v in spec.get("exclude") or ()}
    out = []
    for value, ids in assigned.dropna().groupby(assigned.dropna(), sort=False).groups.items():
        if value in exclude:
            log.warning("mapping file %s: %d case(s) of excluded site %s left out", path, len(ids), value)
            continue
        out.append((value if single else f"{cohort.name}-{value}", cohort.name, list(ids)))
    order = [str(v) for v in spec.get("order") or ()]
    if order:
        rank = {v: i for i, v in enumerate(order)}
        out.sort(key=lambda g: rank.get(g[0].removeprefix(f"{cohort.name}-"), len(rank)))
    return out


def site_names(sites: Sequence[Site], role: str | None = None) -> list[str]:
    """Names of the sites (optionally of one role)."""
    return [s.name for s in sites if role is None or s.role == role]
