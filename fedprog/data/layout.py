"""``DatasetLayout``: where a dataset's files are and how to read them (``fedprog.yaml`` + Hydra keys)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fedprog.data.errors import LayoutError
from fedprog.data.harmonize import DEFAULT_MAX_MISSING_GENES_FRACTION, GENE_POLICIES

log = logging.getLogger(__name__)

MANIFEST = "fedprog.yaml"
STRONG_WSI = "wsi"
FORMATS = ("fedprog", "fed_tcga_brca")
GROUP_KINDS = ("compositions", "signatures")
DUPLICATE_POLICIES = ("error", "identical")
MISSING_POLICIES = ("error", "drop", "keep")
ON_MISSING = ("drop", "error")
DAYS_PER_MONTH = 30.4375  # the mean Gregorian month
TIME_UNITS = {"days": 1.0 / DAYS_PER_MONTH, "months": 1.0, "years": 12.0}  # factor to months
# Keys a data config may carry that the layout does not use (the generator's parameters, for example).
_IGNORED_KEYS = {"synth", "generate_if_missing"}


@dataclass(frozen=True)
class TablePart:
    """One file contributing columns to a table.

    Parameters
    ----------
    path : str
        File inside each cohort folder (or absolute): CSV, CSV.gz or Parquet with a ``case_id`` column.
    columns : list of str or None
        Columns to keep (None: every column except ``case_id`` and unnamed index columns).
    categorical : list of str
        Columns holding categories (kept as strings; one-hot encoded by ``TabularTransform``).
    duplicates : {"error", "identical"}
        Repeated case ids are an error, or (``identical``) allowed if the rows agree on ``columns``.
    missing : {"error", "drop", "keep"}
        NaN in ``columns``: an error naming file/column/case, drop the case (see ``Cohort.dropped``), or
        keep the NaN (``TabularTransform`` then imputes numeric columns and gives categories a missing level).
    optional : bool
        Per-cohort "use what the cohort has": a cohort folder without this file, or a file without some of
        ``columns`` (which must then be listed), gets those columns as missing (NaN) for every case. The
        tabular transform imputes a numeric one at the training mean with a ``<column>__missing`` indicator
        and gives a categorical one the ``<missing>`` level. Needs ``missing: keep``.
    """

    path: str
    columns: tuple[str, ...] | None = None
    categorical: tuple[str, ...] = ()
    duplicates: str = "error"
    missing: str = "error"
    optional: bool = False


@dataclass(frozen=True)
class TableSpec:
    """A modality table: one or more :class:`TablePart` merged on ``case_id``."""

    name: str
    parts: tuple[TablePart, ...]

    @property
    def categorical(self) -> tuple[str, ...]:
        """Categorical columns over all parts."""
        return tuple(col for part in self.parts for col in part.categorical)


@dataclass(frozen=True)
class GroupSpec:
    """Gene-group definitions: ``kind`` compositions (gene x group 0/1) or signatures (columns = groups)."""

    path: str
    kind: str = "compositions"
    min_genes: int = 1
    empty: str = "error"  # a group naming no known gene: "error" (default) or "drop" with a warning


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset lives and how it is read (architecture section 1).

    ``root`` is absolute; table paths are relative to ``<root>/<cohort>/``; ``groups``, ``truth`` to ``root``.
    Keys beyond the architecture's list (all optional): ``format`` (``fedprog`` | ``fed_tcga_brca``),
    ``on_missing`` (``drop`` | ``error``: labels without features), ``gene_policy`` (``intersection`` |
    ``union`` | ``strict``) and ``max_missing_genes_fraction`` (default 0.1; see
    :mod:`fedprog.data.harmonize`), ``transform`` (``ExpressionTransform`` keyword arguments),
    ``tabular`` (``TabularTransform`` keyword arguments), ``min_patches`` (a bag with fewer patches is an
    error; default 1), ``time_unit`` (``days`` | ``months`` | ``years``, or a mapping cohort -> unit; labels
    are converted to months on load), ``pseudo_sites`` (N: a cohort whose labels have no site column is
    split into N seeded pseudo hospitals ``p1..pN``, see :func:`fedprog.data.cohort.pseudo_site_labels`;
    or a mapping cohort -> N) with ``pseudo_site_seed``, ``gene_map`` (``{path, probe_column: probe,
    gene_column: gene}``: a CSV relative to ``root`` renaming probe-level expression columns to gene symbols,
    see :func:`fedprog.data.cohort.map_probes`), ``site_standardize`` (standardize each hospital's WSI patch
    features with its own label-free channel mean and std, :mod:`fedprog.data.site_norm`; default false),
    ``bag_standardize`` (standardize each case's WSI bag with its own channel mean and std over its patches;
    default false; not with ``site_standardize``, which it would undo).
    """

    name: str
    root: Path
    cohorts: tuple[str, ...]
    labels: str = "labels.csv"
    tables: Mapping[str, TableSpec] = field(default_factory=dict)
    expression: str | None = None
    strong: str | None = None
    features: str | None = None
    groups: GroupSpec | None = None
    site_column: str | None = "site"
    truth: str | None = None
    format: str = "fedprog"
    on_missing: str = "drop"
    gene_policy: str = "intersection"
    transform: Mapping[str, Any] = field(default_factory=dict)
    tabular: Mapping[str, Any] = field(default_factory=dict)
    min_patches: int = 1
    max_missing_genes_fraction: float = DEFAULT_MAX_MISSING_GENES_FRACTION
    time_unit: str | Mapping[str, str] = "months"
    pseudo_sites: int | Mapping[str, int] | None = None
    pseudo_site_seed: int = 0
    gene_map: Mapping[str, Any] | None = None
    site_standardize: bool = False
    bag_standardize: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, cfg_or_root: str | Path | Mapping[str, Any] | DictConfig) -> DatasetLayout:
        """Build a layout from a dataset folder (its ``fedprog.yaml``) or from a data config.

        A config's keys override the manifest of its ``root`` when that manifest exists.
        """
        if isinstance(cfg_or_root, str | Path):
            keys: dict[str, Any] = {"root": str(cfg_or_root)}
        elif isinstance(cfg_or_root, DictConfig):
            keys = OmegaConf.to_container(cfg_or_root, resolve=True)  # type: ignore[assignment]
        else:
            keys = dict(cfg_or_root)
        keys = _without_unset(keys)
        if not keys.get("root"):
            raise LayoutError(
                "data config has no 'root' (the dataset folder): give data.root=DIR (data=folder), or set "
                "FEDPROG_SHARED to the folder holding data/tcga (data=tcga)"
            )
        root = Path(str(keys["root"])).expanduser().resolve()
        manifest = root / MANIFEST
        merged: dict[str, Any] = {}
        if manifest.is_file():
            merged.update(read_manifest(manifest))
        elif set(keys) <= {"root"}:
            hint = "" if root.is_dir() else " (the folder does not exist)"
            raise LayoutError(
                f"{manifest} not found and no data config keys given: cannot tell the layout of "
                f"{root}{hint}; write a fedprog.yaml manifest there (README: your own data) or use a data "
                "config (data=tcga | data=synth)"
            )
        merged = merge_keys(merged, keys)
        merged["root"] = root
        return cls.from_dict(merged)

    @classmethod
    def from_dict(cls, keys: Mapping[str, Any]) -> DatasetLayout:
        """Validate plain keys (already merged) into a layout; every problem names the key."""
        root = Path(keys["root"]).expanduser().resolve()
        where = f"data layout of {root}"
        unknown = set(keys) - {f for f in cls.__dataclass_fields__} - _IGNORED_KEYS
        if unknown:
            log.warning("%s: ignoring unknown key(s) %s", where, sorted(unknown))
        labels = str(keys.get("labels") or "labels.csv")
        cohorts = keys.get("cohorts")
        if not cohorts:
            if not root.is_dir():
                raise LayoutError(f"{where}: dataset folder {root} does not exist")
            cohorts = sorted(p.name for p in root.iterdir() if (p / labels).is_file())
            if not cohorts:
                raise LayoutError(f"{where}: no 'cohorts' given and no sub-folder of {root} holds {labels}")
        if isinstance(cohorts, str):
            cohorts = [cohorts]
        tables = {
            str(name): _table_spec(str(name), spec, where)
            for name, spec in (keys.get("tables") or {}).items()
        }
        groups = keys.get("groups")
        group_spec = _group_spec(groups, where) if groups else None
        layout = cls(
            name=str(keys.get("name") or root.name),
            root=root,
            cohorts=tuple(str(c) for c in cohorts),
            labels=labels,
            tables=tables,
            expression=keys.get("expression"),
            strong=keys.get("strong"),
            features=keys.get("features"),
            groups=group_spec,
            site_column=keys.get("site_column", "site"),
            truth=keys.get("truth"),
            format=str(keys.get("format") or "fedprog"),
            on_missing=str(keys.get("on_missing") or "drop"),
            gene_policy=str(keys.get("gene_policy") or "intersection"),
            transform=dict(keys.get("transform") or {}),
            tabular=dict(keys.get("tabular") or {}),
            min_patches=int(keys.get("min_patches") or 1),
            max_missing_genes_fraction=float(
                _default(keys.get("max_missing_genes_fraction"), DEFAULT_MAX_MISSING_GENES_FRACTION)
            ),
            time_unit=_plain_value(keys.get("time_unit") or "months"),
            pseudo_sites=_plain_value(keys.get("pseudo_sites")),
            pseudo_site_seed=int(keys.get("pseudo_site_seed") or 0),
            gene_map=_gene_map(keys.get("gene_map"), where),
            site_standardize=_flag(keys.get("site_standardize"), "site_standardize", where),
            bag_standardize=_flag(keys.get("bag_standardize"), "bag_standardize", where),
        )
        layout.validate()
        return layout

    def validate(self) -> None:
        """Check the keys against each other (not the files); raise :class:`LayoutError` naming the key."""
        where = f"data layout {self.name!r} ({self.root})"
        _choice(self.format, FORMATS, "format", where)
        _choice(self.on_missing, ON_MISSING, "on_missing", where)
        _choice(self.gene_policy, GENE_POLICIES, "gene_policy", where)
        if len(set(self.cohorts)) != len(self.cohorts):
            raise LayoutError(f"{where}: 'cohorts' lists a cohort twice: {list(self.cohorts)}")
        if self.expression is not None and self.expression not in self.tables:
            raise LayoutError(
                f"{where}: expression={self.expression!r} is not a table (tables: {sorted(self.tables)})"
            )
        if self.strong == STRONG_WSI:
            if not self.features:
                raise LayoutError(
                    f"{where}: strong='wsi' needs WSI bags but 'features' is null (this dataset has no WSI "
                    f"features); use strong=<table> (tables: {sorted(self.tables)})"
                )
        elif self.strong is not None and self.strong not in self.tables:
            raise LayoutError(
                f"{where}: strong={self.strong!r} is neither 'wsi' nor a table "
                f"(tables: {sorted(self.tables)})"
            )
        for key in ("site_standardize", "bag_standardize"):
            if getattr(self, key) and self.strong_kind != STRONG_WSI:
                raise LayoutError(
                    f"{where}: {key}=true standardizes WSI patch features but strong={self.strong!r}"
                )
        if self.site_standardize and self.bag_standardize:
            raise LayoutError(
                f"{where}: site_standardize and bag_standardize are both true; choose one (per-bag "
                "standardization removes any per-channel shift and scale, the site's included)"
            )
        if self.min_patches < 1:
            raise LayoutError(f"{where}: min_patches must be >= 1, got {self.min_patches}")
        if not 0.0 <= self.max_missing_genes_fraction <= 1.0:
            raise LayoutError(
                f"{where}: max_missing_genes_fraction must be in [0, 1], "
                f"got {self.max_missing_genes_fraction}"
            )
        for cohort in self.cohorts:
            _choice(
                self.cohort_time_unit(cohort), tuple(TIME_UNITS), "time_unit", f"{where}, cohort {cohort}"
            )
            n = self.cohort_pseudo_sites(cohort)
            if n is not None and n < 1:
                raise LayoutError(f"{where}: pseudo_sites for cohort {cohort} must be >= 1, got {n}")

    def cohort_time_unit(self, cohort: str) -> str:
        """Time unit of a cohort's labels (``time_unit`` as one unit or a mapping cohort -> unit)."""
        if isinstance(self.time_unit, Mapping):
            return str(self.time_unit.get(cohort, "months"))
        return str(self.time_unit)

    def cohort_pseudo_sites(self, cohort: str) -> int | None:
        """Number of pseudo sites of a cohort without a site column (None: the cohort is one site)."""
        value = self.pseudo_sites.get(cohort) if isinstance(self.pseudo_sites, Mapping) else self.pseudo_sites
        return None if value is None else int(value)

    # ------------------------------------------------------------------ paths
    @property
    def strong_kind(self) -> str | None:
        """``"wsi"``, ``"tabular"`` or None (no strong modality)."""
        if self.strong is None:
            return None
        return "wsi" if self.strong == STRONG_WSI else "tabular"

    @property
    def used_tables(self) -> tuple[str, ...]:
        """Tables that ``load_cohort`` reads by default: the expression and a tabular strong modality."""
        names = [self.expression, self.strong if self.strong_kind == "tabular" else None]
        return tuple(dict.fromkeys(n for n in names if n is not None))

    def cohort_dir(self, cohort: str) -> Path:
        """Folder of one cohort."""
        return self.root / cohort

    def cohort_file(self, cohort: str, path: str) -> Path:
        """A file inside a cohort folder (absolute paths are kept)."""
        p = Path(path)
        return p if p.is_absolute() else self.cohort_dir(cohort) / p

    def root_file(self, path: str) -> Path:
        """A file relative to the dataset root (absolute paths are kept)."""
        p = Path(path)
        return p if p.is_absolute() else self.root / p

    def to_dict(self) -> dict[str, Any]:
        """Plain keys (the manifest form), round-tripping through :meth:`from_dict`."""
        tables = {
            name: [
                {
                    "path": part.path,
                    "columns": None if part.columns is None else list(part.columns),
                    "categorical": list(part.categorical),
                    "duplicates": part.duplicates,
                    "missing": part.missing,
                    "optional": part.optional,
                }
                for part in spec.parts
            ]
            for name, spec in self.tables.items()
        }
        groups = None
        if self.groups is not None:
            g = self.groups
            groups = {"path": g.path, "kind": g.kind, "min_genes": g.min_genes, "empty": g.empty}
        return {
            "name": self.name,
            "root": str(self.root),
            "cohorts": list(self.cohorts),
            "labels": self.labels,
            "tables": tables,
            "expression": self.expression,
            "strong": self.strong,
            "features": self.features,
            "groups": groups,
            "site_column": self.site_column,
            "truth": self.truth,
            "format": self.format,
            "on_missing": self.on_missing,
            "gene_policy": self.gene_policy,
            "transform": dict(self.transform),
            "tabular": dict(self.tabular),
            "min_patches": self.min_patches,
            "max_missing_genes_fraction": self.max_missing_genes_fraction,
            "time_unit": _plain_value(self.time_unit),
            "pseudo_sites": _plain_value(self.pseudo_sites),
            "pseudo_site_seed": self.pseudo_site_seed,
            "gene_map": _plain_value(self.gene_map),
            "site_standardize": self.site_standardize,
            "bag_standardize": self.bag_standardize,
        }


UNSET = "???"


def _without_unset(value: Any) -> Any:
    """Drop ``???`` (unset: take the manifest's) values recursively, and mappings left empty by that."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(item, str) and item == UNSET:
                continue
            cleaned = _without_unset(item)
            if isinstance(item, Mapping) and item and not cleaned:
                continue
            out[key] = cleaned
        return out
    return value


def merge_keys(manifest: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """Config keys over manifest keys; mappings merged key by key (``groups.path`` alone keeps ``kind``)."""
    merged = dict(manifest)
    for key, value in config.items():
        base = merged.get(key)
        if isinstance(value, Mapping) and isinstance(base, Mapping):
            if key == "tables":  # one level deeper: a table given as a mapping merges with the manifest's
                tables = dict(base)
                for name, spec in value.items():
                    old = tables.get(name)
                    both = isinstance(old, Mapping) and isinstance(spec, Mapping)
                    tables[name] = {**old, **spec} if both else spec
                merged[key] = tables
            else:
                merged[key] = {**base, **value}
        else:
            merged[key] = value
    return merged


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a ``fedprog.yaml`` manifest into plain keys (its folder is the root)."""
    try:
        keys = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise LayoutError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(keys, dict):
        raise LayoutError(f"{path}: manifest must be a mapping of layout keys, got {type(keys).__name__}")
    keys.pop("root", None)
    return keys


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _flag(value: Any, key: str, where: str) -> bool:
    """A true/false key (absent: false); anything else is an error naming the key."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise LayoutError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _plain_value(value: Any) -> Any:
    """A mapping as a plain dict (hashable layouts compare equal after a round trip), else the value."""
    return dict(value) if isinstance(value, Mapping) else value


def _choice(value: str, allowed: tuple[str, ...], key: str, where: str) -> None:
    if value not in allowed:
        raise LayoutError(f"{where}: {key}={value!r} is not one of {list(allowed)}")


def _table_spec(name: str, spec: Any, where: str) -> TableSpec:
    raw_parts = spec if isinstance(spec, list | tuple) else [spec]
    parts = []
    for raw in raw_parts:
        if isinstance(raw, str):
            raw = {"path": raw}
        if not isinstance(raw, Mapping) or not raw.get("path"):
            raise LayoutError(f"{where}: table {name!r}: each part needs a 'path', got {raw!r}")
        extra = set(raw) - {"path", "columns", "categorical", "duplicates", "missing", "optional"}
        if extra:
            raise LayoutError(f"{where}: table {name!r}: unknown key(s) {sorted(extra)}")
        columns = raw.get("columns")
        part = TablePart(
            path=str(raw["path"]),
            columns=None if columns is None else tuple(str(c) for c in columns),
            categorical=tuple(str(c) for c in raw.get("categorical") or ()),
            duplicates=str(raw.get("duplicates") or "error"),
            missing=str(raw.get("missing") or "error"),
            optional=bool(raw.get("optional") or False),
        )
        _choice(part.duplicates, DUPLICATE_POLICIES, f"tables.{name}.duplicates", where)
        _choice(part.missing, MISSING_POLICIES, f"tables.{name}.missing", where)
        if part.optional and (part.columns is None or part.missing != "keep"):
            raise LayoutError(
                f"{where}: table {name!r} part {part.path}: optional: true needs its 'columns' listed and "
                "missing: keep"
            )
        if part.columns is not None:
            stray = set(part.categorical) - set(part.columns)
            if stray:
                raise LayoutError(f"{where}: table {name!r}: categorical {sorted(stray)} not in its columns")
        parts.append(part)
    if not parts:
        raise LayoutError(f"{where}: table {name!r} has no parts")
    return TableSpec(name=name, parts=tuple(parts))


def _gene_map(raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, Mapping) or not raw.get("path"):
        raise LayoutError(f"{where}: 'gene_map' needs a 'path' (probe -> gene CSV), got {raw!r}")
    extra = set(raw) - {"path", "probe_column", "gene_column"}
    if extra:
        raise LayoutError(f"{where}: gene_map: unknown key(s) {sorted(extra)}")
    return dict(raw)


def _group_spec(raw: Any, where: str) -> GroupSpec:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, Mapping) or not raw.get("path"):
        raise LayoutError(f"{where}: 'groups' needs a 'path', got {raw!r}")
    spec = GroupSpec(
        path=str(raw["path"]),
        kind=str(raw.get("kind") or "compositions"),
        min_genes=int(raw.get("min_genes") or 1),
        empty=str(raw.get("empty") or "error"),
    )
    _choice(spec.kind, GROUP_KINDS, "groups.kind", where)
    _choice(spec.empty, ("error", "drop"), "groups.empty", where)
    if spec.min_genes < 1:
        raise LayoutError(f"{where}: groups.min_genes must be >= 1, got {spec.min_genes}")
    return spec
