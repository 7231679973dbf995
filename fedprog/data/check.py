"""``fedprog data check DIR``: run every validation on a dataset and print a per-cohort summary table."""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf
from sksurv.nonparametric import kaplan_meier_estimator

from fedprog.data.bags import bag_shape
from fedprog.data.cohort import CENSOR, SITE, TIME, Cohort, load_cohorts
from fedprog.data.errors import BagError, CohortError, LayoutError
from fedprog.data.groups import GeneGroups, load_groups
from fedprog.data.harmonize import feature_genes, max_missing_fraction
from fedprog.data.layout import MANIFEST, DatasetLayout, read_manifest

log = logging.getLogger(__name__)

EXIT_INVALID = 2
TOTAL = "total"


@dataclass
class CohortSummary:
    """Summary numbers of one cohort (or of all cohorts: ``cohort == "total"``); NaN where undefined."""

    cohort: str
    cases: int
    events: int
    censoring_rate: float
    median_followup: float  # months, reverse Kaplan-Meier median (NaN if the curve never reaches 0.5)
    sites: int
    genes: int
    groups: int
    bags: int
    patches_min: float
    patches_median: float
    patches_max: float
    feature_dim: int
    dropped: int


@dataclass
class DatasetSummary:
    """Result of :func:`check_dataset`: one row per cohort plus the total."""

    name: str
    root: Path
    cohorts: list[CohortSummary]
    total: CohortSummary
    notes: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """Rows per cohort and the total, indexed by cohort."""
        return pd.DataFrame([asdict(r) for r in [*self.cohorts, self.total]]).set_index("cohort")

    def format(self) -> str:
        """A plain-text table for the terminal."""
        frame = self.to_frame()
        frame["censoring_rate"] = frame["censoring_rate"].map(lambda v: f"{v:.1%}")
        frame["median_followup"] = frame["median_followup"].map(
            lambda v: "n/a" if np.isnan(v) else f"{v:.1f}"
        )
        for col in ("patches_min", "patches_median", "patches_max"):
            frame[col] = frame[col].map(lambda v: "-" if np.isnan(v) else f"{v:g}")
        frame = frame.rename(
            columns={
                "censoring_rate": "censored",
                "median_followup": "follow-up (mo)",
                "patches_min": "patches min",
                "patches_median": "median",
                "patches_max": "max",
                "feature_dim": "dim",
            }
        )
        lines = [f"dataset {self.name} ({self.root})", frame.to_string()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def median_followup(times: np.ndarray, censorship: np.ndarray) -> float:
    """Median follow-up by reverse Kaplan-Meier (censoring as the event), months; NaN (logged) if undefined.

    Parameters
    ----------
    times : np.ndarray, float, shape = (n,)
    censorship : np.ndarray, 0/1, shape = (n,), 1 = censored
    """
    censored = np.asarray(censorship) == 1
    if not censored.any():
        log.info("median follow-up undefined: no censored case")
        return float("nan")
    grid, surv = kaplan_meier_estimator(censored, np.asarray(times, dtype=np.float64))
    below = np.flatnonzero(surv <= 0.5)
    if not len(below):
        log.info("median follow-up undefined: the reverse Kaplan-Meier curve stays above 0.5")
        return float("nan")
    return float(grid[below[0]])


def _bag_stats(cohort: Cohort, dim: int | None, min_patches: int) -> tuple[list[int], int, int | None]:
    """Read every bag's shape; return (patches per case, number of bag files, feature dim)."""
    per_case, n_files = [], 0
    for case, paths in cohort.bag_paths.items():
        total = 0
        for path in paths:
            n, d = bag_shape(path, case_id=case, cohort=cohort.name)
            if dim is None:
                dim = d
            elif d != dim:
                raise BagError(
                    f"bag file {path} (case {case}, cohort {cohort.name}): feature dimension {d} differs "
                    f"from the dataset's {dim}"
                )
            if n < min_patches:
                raise BagError(
                    f"bag file {path} (case {case}, cohort {cohort.name}): {n} patches < min_patches "
                    f"{min_patches}"
                )
            total += n
            n_files += 1
        per_case.append(total)
    return per_case, n_files, dim


def _row(
    name: str,
    labels: pd.DataFrame,
    *,
    genes: int,
    groups: int,
    patches: list[int],
    bags: int,
    dim: int,
    dropped: int,
) -> CohortSummary:
    times = labels[TIME].to_numpy(dtype=np.float64)
    cens = labels[CENSOR].to_numpy()
    p = np.asarray(patches, dtype=np.float64)
    return CohortSummary(
        cohort=name,
        cases=len(labels),
        events=int((cens == 0).sum()),
        censoring_rate=float(cens.mean()),
        median_followup=median_followup(times, cens),
        sites=int(labels[[SITE, "cohort"]].drop_duplicates().shape[0]),
        genes=genes,
        groups=groups,
        bags=bags,
        patches_min=float(p.min()) if len(p) else float("nan"),
        patches_median=float(np.median(p)) if len(p) else float("nan"),
        patches_max=float(p.max()) if len(p) else float("nan"),
        feature_dim=dim,
        dropped=dropped,
    )


def check_dataset(layout: DatasetLayout) -> DatasetSummary:
    """Load and validate every cohort (labels, tables, genes, groups, every bag) and summarize.

    Raises
    ------
    CohortError
        The first problem found, naming its file, column, case or site.
    """
    cohorts = load_cohorts(layout)
    notes = []
    groups: GeneGroups | None = None
    genes: list[str] = []
    if layout.expression is not None:
        lists = {name: c.genes for name, c in cohorts.items()}
        genes = feature_genes(lists, layout.gene_policy)
        notes += _gene_notes(lists, max_missing_fraction(layout))
    if layout.groups is not None and layout.expression is not None:
        groups = load_groups(layout).restrict(genes)
    dim: int | None = None
    rows, all_patches, all_bags = [], [], 0
    for name, cohort in cohorts.items():
        patches, n_bags, dim = _bag_stats(cohort, dim, layout.min_patches)
        all_patches += patches
        all_bags += n_bags
        width = dim or 0
        if layout.strong_kind == "tabular":
            width = cohort.tables[str(layout.strong)].shape[1]
        rows.append(
            _row(
                name,
                cohort.labels,
                genes=len(cohort.genes),
                groups=len(groups or []),
                patches=patches,
                bags=n_bags,
                dim=width,
                dropped=len(cohort.dropped),
            )
        )
        if len(cohort.dropped):
            reasons = cohort.dropped["reason"].str.replace(r"\(.*", "", regex=True).value_counts()
            notes.append(
                f"{name}: dropped {len(cohort.dropped)} case(s): "
                + ", ".join(f"{r.strip()} x{n}" for r, n in reasons.items())
            )
    labels = pd.concat([c.labels[[TIME, CENSOR, SITE, "cohort"]] for c in cohorts.values()])
    total = _row(
        TOTAL,
        labels,
        genes=len(genes),
        groups=len(groups or []),
        patches=all_patches,
        bags=all_bags,
        dim=rows[0].feature_dim,
        dropped=sum(r.dropped for r in rows),
    )
    if groups is not None:
        notes.append(
            f"groups: {len(groups)} of {layout.groups.path} keep >= {groups.min_genes} gene(s); "
            f"{len(groups.gene_order)} of {len(genes)} genes are in a group"
        )
    return DatasetSummary(layout.name, layout.root, rows, total, notes)


def _gene_notes(lists: dict[str, list[str]], max_fraction: float) -> list[str]:
    """One note per cohort lacking genes that other cohorts have (a held-out site imputes or refuses them)."""
    union = set().union(*(set(g) for g in lists.values()))
    notes = []
    for name, own in lists.items():
        lacking = len(union - set(own))
        if not lacking:
            continue
        fraction = lacking / len(union)
        verdict = (
            f"above max_missing_genes_fraction={max_fraction:g}: refused where the training sites have them"
            if fraction > max_fraction
            else "imputed at the training mean where the training sites have them"
        )
        notes.append(
            f"{name}: lacks {lacking} of the {len(union)} genes of all cohorts ({fraction:.1%}; {verdict})"
        )
    return notes


def layout_from_config(cfg: DictConfig) -> DatasetLayout:
    """The layout of ``cfg.data``.

    When ``<data.root>/fedprog.yaml`` exists, the manifest gives the layout; the keys of ``data=folder`` (and
    its overrides, e.g. ``data.time_unit=days``) are merged over it, while the generated default's keys
    (``data=synth``, the command's default, recognized by its ``synth`` key) are ignored.
    """
    data = cfg.get("data")
    if data is None or data.get("root") is None or str(data.get("root")) == "???":
        raise CohortError("no dataset given: pass DIR (fedprog data check DIR) or data.root=DIR")
    root = Path(str(data.root))
    if (root / MANIFEST).is_file() and "synth" in data:
        return DatasetLayout.load(root)
    return DatasetLayout.load(OmegaConf.to_container(data, resolve=True))  # type: ignore[arg-type]


def add_cohort(
    root: str | Path,
    cohort: str,
    *,
    time_unit: str | None = None,
    pseudo_sites: int | None = None,
    like: str | None = None,
) -> DatasetSummary:
    """Register ``<root>/<cohort>`` in ``<root>/fedprog.yaml`` and check the whole dataset at once.

    The manifest is rewritten only when :func:`check_dataset` passes. ``time_unit`` and ``pseudo_sites`` are
    set for this cohort alone (the manifest's keys become per-cohort mappings where needed). ``like`` names a
    data preset (``configs/data/<like>.yaml``) whose layout starts a folder that has no manifest yet.

    Raises
    ------
    CohortError
        One line naming the folder, file, column or key at fault (the manifest is left unchanged).
    """
    folder = Path(root).expanduser().resolve()
    manifest = folder / MANIFEST
    if like is not None and manifest.is_file():
        raise LayoutError(f"like={like}: {manifest} exists already; like= only starts a new manifest")
    if like is None and not manifest.is_file():
        raise LayoutError(
            f"{manifest} not found: start it from a data preset with like=NAME "
            f"(one of {', '.join(preset_names())}) or write it (README: your own data)"
        )
    keys = read_manifest(manifest) if like is None else manifest_from_preset(like, folder)
    if not (folder / cohort).is_dir():
        raise LayoutError(f"cohort folder {folder / cohort} not found (cohort={cohort})")
    keys["cohorts"] = [c for c in keys.get("cohorts") or [] if c != cohort] + [cohort]
    if time_unit is not None:
        keys["time_unit"] = _per_cohort(keys.get("time_unit"), "months", keys["cohorts"], cohort, time_unit)
    if pseudo_sites is not None:
        keys["pseudo_sites"] = _per_cohort(
            keys.get("pseudo_sites"), None, keys["cohorts"], cohort, pseudo_sites
        )
    layout = DatasetLayout.from_dict({**keys, "root": folder})
    summary = check_dataset(layout)
    manifest.write_text(yaml.safe_dump(keys, sort_keys=False))
    return summary


#: Layout keys of a data preset that name one dataset, not a layout: not copied into a new manifest.
PRESET_ONLY_KEYS = ("root", "cohorts", "synth", "generate_if_missing")
#: Layout keys holding a file path relative to the dataset root (not to a cohort folder).
ROOT_FILE_KEYS = (("groups", "path"), ("gene_map", "path"))


def preset_names() -> list[str]:
    """The data presets (``configs/data/*.yaml``) a new manifest can start from."""
    from fedprog.config import groups

    return [name for name in groups()["data"] if name != "folder"]


def manifest_from_preset(like: str, folder: Path) -> dict[str, Any]:
    """Manifest keys for ``folder`` from the layout of the data preset ``like``, with no cohorts yet.

    Root-level files of the preset (gene groups, a probe -> gene map) that ``folder`` does not hold are
    referenced at the preset's root by absolute path, so the new dataset uses the same gene groups.
    """
    from fedprog.config import compose_config, to_container

    if like not in preset_names():
        raise LayoutError(f"like={like}: no such data preset; choose one of {', '.join(preset_names())}")
    data = to_container(compose_config("train", [f"data={like}"]))["data"]
    preset_root = Path(str(data["root"])).expanduser()
    keys = {k: v for k, v in data.items() if k not in PRESET_ONLY_KEYS}
    keys["name"] = folder.name
    for section, key in ROOT_FILE_KEYS:
        entry = keys.get(section)
        if isinstance(entry, str):  # the short form `groups: FILE`
            entry = keys[section] = {key: entry}
        relative = entry.get(key) if isinstance(entry, dict) else None
        if relative and not (folder / relative).exists():
            if not (preset_root / relative).exists():
                raise LayoutError(
                    f"like={like}: {section}.{key} {relative} is in neither {folder} nor {preset_root}"
                )
            entry[key] = str((preset_root / relative).resolve())
    return keys


def _per_cohort(current: Any, default: Any, cohorts: list[str], cohort: str, value: Any) -> dict[str, Any]:
    """A per-cohort mapping from a manifest value (one value for all, or already a mapping) plus ``value``."""
    if isinstance(current, dict):
        mapping = dict(current)
    else:
        shared = default if current is None else current
        mapping = {} if shared is None else {c: shared for c in cohorts if c != cohort}
    mapping[cohort] = value
    return mapping


def add_main(cfg: DictConfig) -> int:
    """``fedprog data add DIR cohort=NAME``: print the checked summary (exit 0) or one error line (exit 2)."""
    try:
        summary = add_cohort(
            str(cfg.data.root),
            str(cfg.cohort),
            time_unit=cfg.time_unit,
            pseudo_sites=cfg.pseudo_sites,
            like=cfg.like,
        )
    except CohortError as exc:
        print(f"fedprog data add: error: {' | '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_INVALID
    print(summary.format())
    print(f"cohort {cfg.cohort} added to {Path(str(cfg.data.root)) / MANIFEST}")
    return 0


def main(cfg: DictConfig) -> int:
    """``fedprog data check DIR``: print the summary table (exit 0) or one error line (exit 2)."""
    try:
        summary = check_dataset(layout_from_config(cfg))
    except CohortError as exc:
        print(f"fedprog data check: error: {' | '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_INVALID
    print(summary.format())
    return 0
