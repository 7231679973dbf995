"""Load one cohort: labels, modality tables joined on case_id, bag paths; every dropped case is reported."""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedprog.data import cache as table_cache
from fedprog.data.bags import find_bag
from fedprog.data.errors import (
    CohortError,
    DuplicateCaseError,
    InvalidValueError,
    LayoutError,
    MissingColumnError,
    MissingFeaturesError,
    preview,
)
from fedprog.data.layout import TIME_UNITS, DatasetLayout, TablePart, TableSpec

log = logging.getLogger(__name__)

CASE = "case_id"
TIME = "survival_months"
CENSOR = "censorship"
SLIDE = "slide_id"
SITE = "site"
COHORT = "cohort"
TSS = "tss"
# Barcode ``<project>-<TSS>-<participant>``: the TSS is characters 6-7 (TCGA-2F-A9KO -> 2F).
_BARCODE = re.compile(r"^[^-]+-([A-Za-z0-9]{2})(?:-|$)")
_DROPPED_COLUMNS = [CASE, "reason"]


@dataclass
class Cohort:
    """One cancer cohort as loaded from disk (bags are NOT read here).

    Attributes
    ----------
    name : str
        Cohort (folder) name.
    labels : DataFrame
        Indexed by case_id (one row per case): survival_months (float > 0), censorship (int 0/1,
        1 = censored), site (str), cohort (str), plus the labels file's other columns.
    tables : dict of str to DataFrame
        Modality tables indexed by case_id, rows aligned to ``labels.index``.
    bag_paths : dict of str to list of Path
        Bag files per case (one per slide), empty when the layout has no WSI.
    dropped : DataFrame
        Columns case_id, reason: labelled cases removed while loading.
    layout : DatasetLayout
        The layout the cohort was read with.
    """

    name: str
    labels: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    bag_paths: dict[str, list[Path]]
    dropped: pd.DataFrame
    layout: DatasetLayout
    notes: list[str] = field(default_factory=list)

    @property
    def case_ids(self) -> list[str]:
        """Case ids in label order."""
        return list(self.labels.index)

    @property
    def genes(self) -> list[str]:
        """Columns of the expression table (empty without one)."""
        expr = self.layout.expression
        return [] if expr is None or expr not in self.tables else list(self.tables[expr].columns)

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------------- reading
def read_table_file(path: Path) -> pd.DataFrame:
    """Read a CSV, CSV.gz or Parquet file; a missing/unreadable file is a :class:`CohortError` naming it."""
    if not path.is_file():
        raise MissingFeaturesError(f"file {path} not found")
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, low_memory=False)
    except ImportError as exc:
        raise CohortError(f"file {path}: cannot read Parquet ({exc}); install pyarrow or use CSV") from exc
    except (OSError, EOFError, ValueError, zlib.error, pd.errors.ParserError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "truncated or corrupt file"
        raise CohortError(f"file {path}: unreadable ({type(exc).__name__}: {detail})") from exc
    unnamed = [c for c in frame.columns if str(c).startswith("Unnamed:") or str(c) == ""]
    return frame.drop(columns=unnamed)


def require_columns(frame: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    """Raise :class:`MissingColumnError` naming the file, the missing columns and the ones found."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise MissingColumnError(
            f"file {path}: missing column(s) {missing} (found: {preview(frame.columns, 8)})"
        )


def _case_ids(frame: pd.DataFrame, path: Path) -> pd.Series:
    ids = frame[CASE]
    blank = ids.isna() | (ids.astype(str).str.strip() == "")
    if blank.any():
        rows = [int(i) + 2 for i in np.flatnonzero(blank.to_numpy())]  # +2: header line, 1-based
        raise InvalidValueError(f"file {path}, column {CASE}: empty case id on line(s) {preview(rows)}")
    return ids.astype(str).str.strip()


def numeric_columns(
    frame: pd.DataFrame, columns: Sequence[str], path: Path, *, allow_nan: bool = False
) -> pd.DataFrame:
    """Return ``frame[columns]`` as float64, raising :class:`InvalidValueError` naming file, column and case.

    ``frame`` is indexed by case_id. Non-numeric entries and infinities are always errors; NaN is an error
    unless ``allow_nan``.
    """
    out = frame.loc[:, list(columns)]
    bad_dtype = [c for c, dtype in out.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
    if bad_dtype:
        converted = out[bad_dtype].apply(pd.to_numeric, errors="coerce")
        for col in bad_dtype:
            junk = converted[col].isna() & out[col].notna()
            if junk.any():
                cases = list(out.index[junk.to_numpy()])
                values = list(out.loc[junk, col].astype(str))
                raise InvalidValueError(
                    f"file {path}, column {col}: non-numeric value(s) {preview(values, 3)} "
                    f"for case(s) {preview(cases)}"
                )
        out = out.copy()
        out[bad_dtype] = converted
    values = out.to_numpy(dtype=np.float64)
    checks = [("infinite", np.isinf(values))]
    if not allow_nan:
        checks.append(("NaN (missing)", np.isnan(values)))
    for what, mask in checks:
        if mask.any():
            rows, cols = np.nonzero(mask)
            col_names = list(dict.fromkeys(out.columns[cols]))
            cases = list(dict.fromkeys(out.index[rows]))
            raise InvalidValueError(
                f"file {path}: {what} value(s) in column(s) {preview(col_names, 3)} "
                f"for case(s) {preview(cases)}"
            )
    return out.astype(np.float64)


def read_labels(
    path: Path,
    cohort: str,
    site_column: str | None,
    *,
    time_unit: str = "months",
    pseudo_sites: int | None = None,
    pseudo_seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Read and validate a labels table.

    Times in ``time_unit`` (days | months | years) are converted to months (a warning names the file when
    their distribution looks like another unit, see :func:`check_time_unit`). Without a site column (or, with
    ``site_column: tss``, without TCGA-like barcodes) and with ``pseudo_sites`` N, cases get seeded pseudo
    sites (:func:`pseudo_site_labels`).

    Returns
    -------
    labels : DataFrame
        One row per case, indexed by case_id: survival_months, censorship (int), site, cohort + other columns.
    slides : dict of str to list of str
        Slide ids per case (empty when the file has no ``slide_id`` column).
    """
    frame = read_table_file(path)
    require_columns(frame, [CASE, TIME, CENSOR], path)
    if frame.empty:
        raise InvalidValueError(f"file {path}: no case (the labels file holds a header only)")
    frame[CASE] = _case_ids(frame, path)
    slides = _slides(frame, path)
    _convert_outcomes(frame, path, time_unit)
    if SLIDE in frame.columns:
        conflict = frame.groupby(CASE)[[TIME, CENSOR]].nunique().max(axis=1) > 1
        if conflict.any():
            raise InvalidValueError(
                f"file {path}: slide rows of case(s) {preview(conflict.index[conflict])} disagree on "
                f"{TIME}/{CENSOR}"
            )
        frame = frame.drop(columns=[SLIDE]).drop_duplicates(CASE)
    frame[SITE] = _label_sites(frame, path, cohort, site_column, pseudo_sites, pseudo_seed)
    frame[COHORT] = cohort
    labels = frame.set_index(CASE)
    labels.index.name = CASE
    return labels, slides


def _slides(frame: pd.DataFrame, path: Path) -> dict[str, list[str]]:
    """Slide ids per case (strips ``slide_id`` in place); raise on a duplicated case or (case, slide) row."""
    slides: dict[str, list[str]] = {}
    if SLIDE not in frame.columns:
        dup = frame[CASE].duplicated()
        if dup.any():
            raise DuplicateCaseError(
                f"file {path}, column {CASE}: duplicate case id(s) {preview(frame.loc[dup, CASE].unique())} "
                f"(several rows per case need a {SLIDE} column)"
            )
        return slides
    frame[SLIDE] = frame[SLIDE].astype(str).str.strip()
    dup = frame.duplicated([CASE, SLIDE])
    if dup.any():
        pairs = [f"({c}, {s})" for c, s in frame.loc[dup, [CASE, SLIDE]].itertuples(index=False)]
        raise DuplicateCaseError(f"file {path}: duplicate (case_id, slide_id) pair(s) {preview(pairs, 3)}")
    for case, slide in frame[[CASE, SLIDE]].itertuples(index=False):
        slides.setdefault(case, []).append(slide)
    return slides


def _convert_outcomes(frame: pd.DataFrame, path: Path, time_unit: str) -> None:
    """Check times (> 0) and censorship (0/1) and write them in place as months (float) and int."""
    numbers = numeric_columns(frame.set_index(CASE, drop=False), [TIME, CENSOR], path)
    times, cens = numbers[TIME], numbers[CENSOR]
    bad_time = times <= 0
    if bad_time.any():
        raise InvalidValueError(
            f"file {path}, column {TIME}: zero or negative time(s) {preview(times[bad_time].tolist(), 3)} "
            f"for case(s) {preview(times.index[bad_time].unique())}"
        )
    bad_cens = ~cens.isin([0.0, 1.0])
    if bad_cens.any():
        raise InvalidValueError(
            f"file {path}, column {CENSOR}: value(s) {preview(cens[bad_cens].unique().tolist(), 3)} "
            "not in {0, 1} "
            f"(1 = censored, 0 = event) for case(s) {preview(cens.index[bad_cens].unique())}"
        )
    if time_unit not in TIME_UNITS:
        raise LayoutError(f"file {path}: time_unit={time_unit!r} is not one of {list(TIME_UNITS)}")
    frame[TIME] = times.to_numpy() * TIME_UNITS[time_unit]
    check_time_unit(frame[TIME].to_numpy(), path, time_unit)
    frame[CENSOR] = cens.to_numpy().astype(np.int64)


def _label_sites(
    frame: pd.DataFrame,
    path: Path,
    cohort: str,
    site_column: str | None,
    pseudo_sites: int | None,
    pseudo_seed: int,
) -> pd.Series | np.ndarray:
    """The site of each case: its site column or barcode (:func:`_sites`), else seeded pseudo sites."""
    use_pseudo = pseudo_sites is not None and not (site_column and site_column in frame.columns)
    if use_pseudo and site_column == TSS and frame[CASE].map(tss_code).notna().all():
        use_pseudo = False  # barcodes carry their tissue source site: real sites win over pseudo ones
    if not use_pseudo:
        return _sites(frame, path, cohort, site_column)
    assert pseudo_sites is not None
    log.info(
        "%s: no %r column; %d seeded pseudo site(s) p1..p%d",
        path,
        site_column,
        pseudo_sites,
        pseudo_sites,
    )
    return pseudo_site_labels(frame[CASE], cohort, pseudo_sites, pseudo_seed).to_numpy()


# Survival times converted to months that look like another unit (warning only): longer than 50 years look
# like days; a median under 6 and a maximum under 25 "months" look like years.
_DAYS_LIKE_MAX_MONTHS = 600.0
_YEARS_LIKE_MEDIAN, _YEARS_LIKE_MAX = 6.0, 25.0


def check_time_unit(months: np.ndarray, path: Path, time_unit: str) -> str | None:
    """Warn (and return the message) when times converted to months look like another unit, else None."""
    if not len(months):
        return None
    top, median = float(np.max(months)), float(np.median(months))
    message = None
    if top > _DAYS_LIKE_MAX_MONTHS:
        message = (
            f"file {path}, column {TIME}: times read as {time_unit} reach {top:.0f} months (> 50 years); "
            "they look like days: set time_unit: days"
        )
    elif median < _YEARS_LIKE_MEDIAN and top < _YEARS_LIKE_MAX and time_unit != "days":
        message = (
            f"file {path}, column {TIME}: times read as {time_unit} have median {median:.2f} and maximum "
            f"{top:.2f} months; they look like years: set time_unit: years if so"
        )
    if message:
        log.warning(message)
    return message


def pseudo_site_labels(case_ids: pd.Series, cohort: str, n_sites: int, seed: int = 0) -> pd.Series:
    """Seeded pseudo hospitals ``p1..pN`` for a cohort without a site column.

    Rule: the sorted unique case ids are permuted by ``numpy.random.default_rng([seed, crc32(cohort)])`` and
    dealt round-robin to ``p1..pN`` (sizes differ by at most one); every row of a case gets its site. The same
    cases, cohort name, N and seed always give the same sites, whatever the file's row order.
    """
    unique = np.array(sorted(set(case_ids.astype(str))))
    rng = np.random.default_rng([int(seed), zlib.crc32(cohort.encode())])
    order = rng.permutation(len(unique))
    site_of = {unique[j]: f"p{rank % n_sites + 1}" for rank, j in enumerate(order)}
    return case_ids.astype(str).map(site_of)


def tss_code(case_id: str) -> str | None:
    """Tissue source site of a barcode (characters 6-7): ``tss_code("TCGA-2F-A9KO") == "2F"``, else None."""
    match = _BARCODE.match(case_id)
    return match.group(1) if match else None


def _sites(frame: pd.DataFrame, path: Path, cohort: str, site_column: str | None) -> pd.Series:
    if site_column and site_column in frame.columns:
        sites = frame[site_column]
        if sites.isna().any():
            cases = frame.loc[sites.isna(), CASE]
            raise InvalidValueError(
                f"file {path}, column {site_column}: missing site for case(s) {preview(cases)}"
            )
        return sites.astype(str).str.strip()
    if site_column == TSS:
        codes = frame[CASE].map(tss_code)
        if codes.isna().any():
            raise InvalidValueError(
                f"file {path}, column {CASE}: cannot read a tissue source site (barcode characters 6-7, "
                f"e.g. TCGA-2F-A9KO -> 2F) from case id(s) {preview(frame.loc[codes.isna(), CASE])}"
            )
        return codes.astype(str)
    if site_column and site_column != SITE:
        raise MissingColumnError(f"file {path}: site_column {site_column!r} is not a column")
    log.info("%s: no %r column; every case of cohort %s is one site %r", path, site_column, cohort, cohort)
    return pd.Series(cohort, index=frame.index, dtype=str)


def read_table(
    layout: DatasetLayout, cohort: str, spec: TableSpec
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Read one modality table (its parts merged on case_id).

    Returns
    -------
    table : DataFrame
        Indexed by case_id; numeric columns float64, categorical columns str (NaN kept where allowed).
    dropped : list of (case_id, reason)
        Cases removed by a part's ``missing: drop`` policy.
    """
    merged: pd.DataFrame | None = None
    dropped: list[tuple[str, str]] = []
    absent: list[str] = []
    for part in spec.parts:
        path = layout.cohort_file(cohort, part.path)
        if part.optional and not path.is_file():
            log.info(
                "cohort %s: optional %s absent; column(s) %s are missing for every case",
                cohort,
                path,
                list(part.columns or ()),
            )
            absent += list(part.columns or ())
            continue
        frame, part_dropped = _read_part(path, part)
        if part.optional and part.columns is not None:
            absent += [c for c in part.columns if c not in frame.columns]
        dropped.extend(part_dropped)
        if merged is None:
            merged = frame
            continue
        clash = set(merged.columns) & set(frame.columns)
        if clash:
            raise LayoutError(
                f"table {spec.name!r}: column(s) {sorted(clash)} appear in two parts ({part.path})"
            )
        merged = merged.join(frame, how="outer")
    if merged is None:
        raise MissingFeaturesError(
            f"cohort {cohort!r}: table {spec.name!r} has no file (every part is optional and absent: "
            f"{', '.join(str(layout.cohort_file(cohort, p.path)) for p in spec.parts)})"
        )
    for col in absent:  # "use what the cohort has": NaN, imputed by the tabular transform (documented rule)
        merged[col] = np.nan
    order = [c for part in spec.parts for c in (part.columns or []) if c in merged.columns]
    rest = [c for c in merged.columns if c not in order]
    return merged[order + rest], dropped


def _read_part(path: Path, part: TablePart) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """A validated table part, from the table cache when the file and spec are unchanged (cache.py)."""
    key = table_cache.part_key(path, part)
    cached = None if key is None else table_cache.load(key)
    if cached is not None:
        return cached
    table, dropped = _read_part_file(path, part)
    if key is not None:
        table_cache.save(key, table, dropped)
    return table, dropped


def _read_part_file(path: Path, part: TablePart) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    frame = read_table_file(path)
    require_columns(frame, [CASE], path)
    frame[CASE] = _case_ids(frame, path)
    columns = list(part.columns) if part.columns is not None else [c for c in frame.columns if c != CASE]
    if part.optional:
        columns = [c for c in columns if c in frame.columns]
    require_columns(frame, columns, path)
    frame = frame[[CASE, *columns]]
    dup = frame[CASE].duplicated(keep=False)
    if dup.any():
        conflicting = frame[dup].drop_duplicates()[CASE].duplicated()
        culprits = frame[dup].drop_duplicates().loc[conflicting, CASE].unique()
        if part.duplicates == "error" or len(culprits):
            which = culprits if len(culprits) else frame.loc[dup, CASE].unique()
            detail = (
                "with differing values" if len(culprits) else "(set duplicates: identical to collapse them)"
            )
            raise DuplicateCaseError(
                f"file {path}, column {CASE}: duplicate case id(s) {preview(which)} {detail}"
            )
        log.info("%s: collapsed %d identical duplicate row(s)", path, int(frame[CASE].duplicated().sum()))
        frame = frame.drop_duplicates(CASE)
    frame = frame.set_index(CASE)
    categorical = [c for c in columns if c in part.categorical]
    numeric = [c for c in columns if c not in part.categorical]
    allow_nan = part.missing != "error"
    out = numeric_columns(frame, numeric, path, allow_nan=allow_nan) if numeric else frame[[]].copy()
    for col in categorical:
        cats = frame[col]
        if cats.isna().any() and part.missing == "error":
            raise InvalidValueError(
                f"file {path}, column {col}: missing category for case(s) {preview(cats.index[cats.isna()])}"
            )
        out[col] = cats.where(cats.isna(), cats.astype(str))
    out = out[columns]
    dropped: list[tuple[str, str]] = []
    if part.missing == "drop":
        nan_rows = out.isna().any(axis=1)
        for case in out.index[nan_rows]:
            cols = list(out.columns[out.loc[case].isna().to_numpy()])
            dropped.append((case, f"missing value in {path.name} column(s) {preview(cols, 3)}"))
        out = out[~nan_rows]
    return out, dropped


def map_probes(table: pd.DataFrame, layout: DatasetLayout, cohort: str) -> pd.DataFrame:
    """Expression columns renamed through the layout's ``gene_map`` (probe -> gene symbol table).

    Rule: a column found in the map's ``probe_column`` takes the gene of ``gene_column``; a column not in the
    map keeps its name (cohorts already in gene symbols can share the map); columns that end up with the same
    gene are averaged (several probes of one gene); a probe listed twice takes its last row. Logged: how
    many columns were mapped and merged.
    """
    spec = layout.gene_map
    assert spec is not None
    path = layout.root_file(str(spec["path"]))
    frame = read_table_file(path)
    probe_col, gene_col = str(spec.get("probe_column") or "probe"), str(spec.get("gene_column") or "gene")
    require_columns(frame, [probe_col, gene_col], path)
    frame = frame.dropna(subset=[probe_col, gene_col])
    mapping = dict(
        zip(frame[probe_col].astype(str).str.strip(), frame[gene_col].astype(str).str.strip(), strict=True)
    )
    genes = [mapping.get(str(c), str(c)) for c in table.columns]
    mapped = sum(str(c) in mapping for c in table.columns)
    out = (
        table.T.groupby(pd.Index(genes, name="gene"), sort=False).mean().T
        if len(set(genes)) < len(genes)
        else table.set_axis(genes, axis=1)
    )
    log.info(
        "cohort %s: gene_map %s mapped %d of %d expression columns to %d genes",
        cohort,
        path.name,
        mapped,
        table.shape[1],
        out.shape[1],
    )
    return out


# ---------------------------------------------------------------------------------------------------- cohort
def load_cohort(layout: DatasetLayout, cohort: str, *, tables: Sequence[str] | None = None) -> Cohort:
    """Load one cohort: validated labels, the modality tables joined on case_id, and bag paths.

    Parameters
    ----------
    layout : DatasetLayout
        The dataset layout.
    cohort : str
        Cohort (folder) name; must be one of ``layout.cohorts``.
    tables : sequence of str, optional
        Tables to read (default: ``layout.used_tables``, the expression and a tabular strong modality).

    Returns
    -------
    Cohort
        Cases lacking a table row or a bag file are dropped (``layout.on_missing == "drop"``, reported in
        ``Cohort.dropped`` and logged) or raise :class:`MissingFeaturesError` (``"error"``).
    """
    if layout.format == "fed_tcga_brca":
        from fedprog.data.flamby import load_flamby_cohort

        return load_flamby_cohort(layout, cohort)
    _check_folders(layout, cohort)
    labels, slides = read_labels(
        layout.cohort_file(cohort, layout.labels),
        cohort,
        layout.site_column,
        time_unit=layout.cohort_time_unit(cohort),
        pseudo_sites=layout.cohort_pseudo_sites(cohort),
        pseudo_seed=layout.pseudo_site_seed,
    )
    reasons: dict[str, str] = {}  # case -> why it is dropped (the first reason found)
    names = list(layout.used_tables if tables is None else tables)
    loaded = {name: _labelled_table(layout, cohort, name, labels.index, reasons) for name in names}
    bag_paths = (
        _bag_paths(layout, cohort, labels.index, slides, reasons) if layout.strong_kind == "wsi" else {}
    )
    dropped = pd.DataFrame(sorted(reasons.items()), columns=_DROPPED_COLUMNS)
    if len(dropped):
        listing = "; ".join(f"{c}: {r}" for c, r in list(reasons.items())[:5])
        if layout.on_missing == "error":
            raise MissingFeaturesError(
                f"cohort {cohort!r}: {len(dropped)} labelled case(s) lack features (on_missing=error): "
                f"{listing}"
            )
        log.warning("cohort %s: dropped %d of %d case(s): %s", cohort, len(dropped), len(labels), listing)
    keep = labels.index.difference(pd.Index(list(reasons)), sort=False)
    if len(keep) == 0:
        example = "; ".join(f"{c}: {r}" for c, r in list(reasons.items())[:3]) or "no labelled case"
        raise MissingFeaturesError(
            f"cohort {cohort!r}: no case left after dropping {len(dropped)} (e.g. {example})"
        )
    labels = labels.loc[keep]
    aligned = {name: table.loc[keep] for name, table in loaded.items()}
    bag_paths = {case: bag_paths[case] for case in keep if case in bag_paths}
    return Cohort(cohort, labels, aligned, bag_paths, dropped, layout)


def require_cohort(layout: DatasetLayout, cohort: str) -> None:
    """Raise :class:`CohortError` unless ``cohort`` is one of ``layout.cohorts``."""
    if cohort not in layout.cohorts:
        raise CohortError(
            f"cohort {cohort!r} is not in the layout's cohorts {list(layout.cohorts)} ({layout.root})"
        )


def _check_folders(layout: DatasetLayout, cohort: str) -> None:
    """Raise :class:`CohortError` unless ``cohort`` is in the layout and its folders exist."""
    require_cohort(layout, cohort)
    if not layout.root.is_dir():
        raise CohortError(
            f"dataset folder {layout.root} not found (layout {layout.name!r}): give data.root=DIR "
            "(your own folder: data=folder data.root=DIR), set FEDPROG_SHARED to the folder holding "
            "data/tcga (data=tcga), or write the generated default with `fedprog synth out=DIR`"
        )
    folder = layout.cohort_dir(cohort)
    if not folder.is_dir():
        raise CohortError(f"cohort {cohort!r}: folder {folder} not found")


def _labelled_table(
    layout: DatasetLayout, cohort: str, name: str, labelled: pd.Index, reasons: dict[str, str]
) -> pd.DataFrame:
    """Table ``name`` of ``cohort``, probes mapped to genes; labelled cases with no row go to ``reasons``."""
    if name not in layout.tables:
        raise CohortError(
            f"cohort {cohort!r}: table {name!r} is not in the layout (tables: {sorted(layout.tables)})"
        )
    spec = layout.tables[name]
    table, part_dropped = read_table(layout, cohort, spec)
    for case, reason in part_dropped:
        if case in labelled:
            reasons.setdefault(case, reason)
    files = "+".join(p.path for p in spec.parts)
    for case in labelled.difference(table.index):
        reasons.setdefault(case, f"no row in table {name!r} ({files})")
    extra = table.index.difference(labelled)
    if len(extra):
        log.info("cohort %s: %d row(s) of table %r have no labels and are ignored", cohort, len(extra), name)
    if name == layout.expression and layout.gene_map is not None:
        table = map_probes(table, layout, cohort)
    return table


def _bag_paths(
    layout: DatasetLayout,
    cohort: str,
    labelled: pd.Index,
    slides: Mapping[str, list[str]],
    reasons: dict[str, str],
) -> dict[str, list[Path]]:
    """Bag files per labelled case (one per slide); a case missing one goes to ``reasons`` instead."""
    features_dir = layout.cohort_file(cohort, str(layout.features))
    if not features_dir.is_dir():
        raise MissingFeaturesError(f"cohort {cohort!r}: features folder {features_dir} not found")
    bag_paths: dict[str, list[Path]] = {}
    for case in labelled:
        paths = []
        for stem in slides.get(case, [case]):
            path = find_bag(features_dir, stem)
            if path is None:
                reasons.setdefault(case, f"missing bag file {features_dir.name}/{stem}.pt|.h5")
                break
            paths.append(path)
        else:
            bag_paths[case] = paths
    return bag_paths


def load_cohorts(layout: DatasetLayout, cohorts: Sequence[str] | None = None) -> dict[str, Cohort]:
    """Load several cohorts, each with its own expression genes.

    Genes are NOT harmonized here: the training sites fix the features when the preprocessing is fitted and
    every other site is aligned to them (:mod:`fedprog.data.harmonize`), so the features never depend on
    which other cohorts sit in the data folder.
    """
    return {name: load_cohort(layout, name) for name in (cohorts or layout.cohorts)}
