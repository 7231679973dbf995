"""Gene groups (pathways / gene families) that turn the expression vector into tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedprog.data.errors import GroupError, preview
from fedprog.data.layout import DatasetLayout, GroupSpec

log = logging.getLogger(__name__)


def group_means(group_index: Sequence[Sequence[int]], n_genes: int) -> np.ndarray:
    """[n_groups, n_genes] averaging matrix: ``expression @ group_means(...).T`` gives each group's score, the
    mean of its genes' (standardized) values. ``group_index`` lists each group's column positions."""
    matrix = np.zeros((len(group_index), n_genes))
    for row, group in enumerate(group_index):
        matrix[row, list(group)] = 1.0 / len(group)
    return matrix


@dataclass(frozen=True)
class GeneGroups:
    """Named gene lists.

    Attributes
    ----------
    names : list of str
        Group names, in definition order.
    genes : list of list of str
        Gene symbols per group (no duplicates within a group; groups may overlap).
    min_genes : int
        ``restrict`` drops groups left with fewer known genes (with a warning).
    empty : {"error", "drop"}
        What ``restrict`` does with a group naming no known gene.
    source : str
        Where the groups came from (named in messages).
    """

    names: list[str]
    genes: list[list[str]]
    min_genes: int = 1
    empty: str = "error"
    source: str = "gene groups"

    def __len__(self) -> int:
        return len(self.names)

    @property
    def gene_order(self) -> list[str]:
        """Unique genes in order of first appearance: the expression columns of a ``SurvivalDataset``."""
        return list(dict.fromkeys(g for genes in self.genes for g in genes))

    def restrict(self, genes: Sequence[str]) -> GeneGroups:
        """Keep only the genes in ``genes`` (the expression columns).

        A group naming no known gene raises :class:`GroupError` naming it (dropped if ``empty="drop"``);
        a group left with fewer than ``min_genes`` genes is dropped with a warning.
        """
        known = set(genes)
        kept_names, kept_genes, empty, small = [], [], [], []
        for name, members in zip(self.names, self.genes, strict=True):
            present = [g for g in members if g in known]
            if not present:
                empty.append(name)
            elif len(present) < self.min_genes:
                small.append(f"{name} ({len(present)})")
            else:
                kept_names.append(name)
                kept_genes.append(present)
        if empty:
            message = (
                f"{self.source}: group(s) {preview(empty)} name no gene of the expression table "
                f"({len(known)} genes, e.g. {preview(sorted(known)[:3], 3)})"
            )
            if self.empty == "error":
                raise GroupError(message)
            log.warning("%s; dropped", message)
        if small:
            log.warning(
                "%s: dropped group(s) with fewer than %d known genes: %s",
                self.source,
                self.min_genes,
                preview(small),
            )
        if not kept_names:
            raise GroupError(
                f"{self.source}: no group keeps at least {self.min_genes} gene(s) of the expression table"
            )
        return GeneGroups(kept_names, kept_genes, self.min_genes, self.empty, self.source)

    def indices(self, genes: Sequence[str]) -> list[list[int]]:
        """Column positions of each group's genes in ``genes`` (:class:`GroupError` on an unknown gene)."""
        position = {g: i for i, g in enumerate(genes)}
        out = []
        for name, members in zip(self.names, self.genes, strict=True):
            missing = [g for g in members if g not in position]
            if missing:
                raise GroupError(
                    f"{self.source}: group {name}: gene(s) {preview(missing)} not in the columns given"
                )
            out.append([position[g] for g in members])
        return out

    def sizes(self) -> list[int]:
        """Number of genes per group."""
        return [len(g) for g in self.genes]


def load_groups(source: DatasetLayout | GroupSpec | str | Path, kind: str | None = None) -> GeneGroups:
    """Read gene-group definitions.

    Parameters
    ----------
    source : DatasetLayout, GroupSpec, str or Path
        A layout (its ``groups`` spec, path relative to the root), a spec, or a file path.
    kind : {"compositions", "signatures"}, optional
        Overrides the spec: ``compositions`` = gene x group 0/1 table, first column gene symbols (SurvPath
        ``*_comps.csv``); ``signatures`` = columns are groups, cells gene symbols (MCAT / Hallmarks).
    """
    if isinstance(source, DatasetLayout):
        if source.groups is None:
            raise GroupError(f"data layout {source.name!r} defines no 'groups'")
        spec, path = source.groups, source.root_file(source.groups.path)
    elif isinstance(source, GroupSpec):
        spec, path = source, Path(source.path)
    else:
        spec, path = GroupSpec(path=str(source), kind=kind or "compositions"), Path(source)
    kind = kind or spec.kind
    frame = _read_raw(path)
    if kind == "compositions":
        names, genes = _compositions(frame, path)
    elif kind == "signatures":
        names, genes = _signatures(frame, path)
    else:
        raise GroupError(f"{path}: unknown group kind {kind!r} (compositions | signatures)")
    if not names:
        raise GroupError(f"{path}: no gene group defined")
    return GeneGroups(names, genes, spec.min_genes, spec.empty, source=str(path))


def _read_raw(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise GroupError(f"gene-group file {path} not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as exc:
        raise GroupError(f"gene-group file {path}: unreadable ({type(exc).__name__})") from exc


def _compositions(frame: pd.DataFrame, path: Path) -> tuple[list[str], list[list[str]]]:
    gene_col = frame.columns[0]
    genes = frame[gene_col].astype(str).str.strip()
    dup = genes.duplicated()
    if dup.any():
        raise GroupError(
            f"{path}: gene(s) {preview(genes[dup].unique())} listed twice in column {gene_col!r}"
        )
    names, members = [], []
    for col in frame.columns[1:]:
        values = pd.to_numeric(frame[col].replace("", np.nan), errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            raise GroupError(
                f"{path}, column {col}: membership must be 0/1, "
                f"got {preview(frame.loc[bad, col].unique(), 3)} "
                f"for gene(s) {preview(genes[bad])}"
            )
        names.append(str(col))
        members.append(list(genes[values.to_numpy() == 1]))
    return names, members


def _signatures(frame: pd.DataFrame, path: Path) -> tuple[list[str], list[list[str]]]:
    names, members = [], []
    for col in frame.columns:
        cells = frame[col].astype(str).str.strip()
        genes = [g for g in cells if g and g.lower() != "nan"]
        names.append(str(col))
        members.append(list(dict.fromkeys(genes)))
    return names, members
