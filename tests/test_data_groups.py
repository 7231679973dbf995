"""Gene groups: compositions and signatures, restriction to known genes, indices."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from fedprog.data import GeneGroups, GroupError, load_groups


def _signatures(tmp_path: Path) -> Path:
    path = tmp_path / "sig.csv"
    pd.DataFrame({"A": ["g1", "g2", "g3"], "B": ["g3", "g4", None], "C": ["x1", None, None]}).to_csv(
        path, index=False
    )
    return path


def test_signatures_and_compositions(tmp_path: Path) -> None:
    groups = load_groups(_signatures(tmp_path), kind="signatures")
    assert groups.names == ["A", "B", "C"] and groups.genes[1] == ["g3", "g4"]
    comps = tmp_path / "comps.csv"
    pd.DataFrame({"A": [1, 1, 0], "B": [0, 1, 1]}, index=["g1", "g2", "g3"]).to_csv(comps)
    groups = load_groups(comps, kind="compositions")
    assert groups.genes == [["g1", "g2"], ["g2", "g3"]]
    assert groups.gene_order == ["g1", "g2", "g3"]
    assert groups.indices(["g3", "g2", "g1"]) == [[2, 1], [1, 0]]


def test_bad_composition_value_names_file_column_gene(tmp_path: Path) -> None:
    comps = tmp_path / "comps.csv"
    pd.DataFrame({"A": [1, 2]}, index=["g1", "g2"]).to_csv(comps)
    with pytest.raises(GroupError, match=r"comps\.csv, column A: membership must be 0/1.*g2"):
        load_groups(comps)


def test_group_without_known_gene_is_an_error(tmp_path: Path) -> None:
    groups = load_groups(_signatures(tmp_path), kind="signatures")
    with pytest.raises(GroupError, match=r"sig\.csv: group\(s\) C name no gene"):
        groups.restrict(["g1", "g2", "g3", "g4"])


def test_small_groups_dropped_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    groups = GeneGroups(["A", "B"], [["g1", "g2", "g3"], ["g1", "g9"]], min_genes=2)
    with caplog.at_level(logging.WARNING):
        kept = groups.restrict(["g1", "g2", "g3"])
    assert kept.names == ["A"] and "B (1)" in caplog.text
    with pytest.raises(GroupError, match="group B: gene"):
        GeneGroups(["B"], [["g1", "g9"]]).indices(["g1"])
