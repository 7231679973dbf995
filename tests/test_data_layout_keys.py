"""Layout keys for one's own cohorts: time units, pseudo sites, data=folder overrides merged key by key."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from data_factory import write_cohort

from fedprog.config import load_config
from fedprog.data import DatasetLayout, LayoutError, build_sites, load_cohort
from fedprog.data.cohort import pseudo_site_labels


def _manifest(layout: DatasetLayout, **keys) -> DatasetLayout:
    path = layout.root / "fedprog.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest.update(keys)
    path.write_text(yaml.safe_dump(manifest))
    return DatasetLayout.load(layout.root)


def test_day_unit_labels_are_converted_to_months(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds", "c0", with_bags=False)
    months = load_cohort(layout, "c0").labels["survival_months"]
    path = layout.cohort_file("c0", "labels.csv")
    labels = pd.read_csv(path)
    labels["survival_months"] = labels["survival_months"] * 30.4375
    labels.to_csv(path, index=False)
    days = load_cohort(_manifest(layout, time_unit={"c0": "days"}), "c0").labels["survival_months"]
    np.testing.assert_allclose(days.to_numpy(), months.to_numpy())
    years = load_cohort(_manifest(layout, time_unit="years"), "c0").labels["survival_months"]
    np.testing.assert_allclose(years.to_numpy(), labels.drop_duplicates("case_id")["survival_months"] * 12)
    with pytest.raises(LayoutError, match=r"time_unit='weeks'"):
        _manifest(layout, time_unit="weeks")


def test_time_unit_warning_when_days_read_as_months(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = write_cohort(tmp_path / "ds", "c0", with_bags=False)
    path = layout.cohort_file("c0", "labels.csv")
    labels = pd.read_csv(path)
    labels["survival_months"] = labels["survival_months"] * 30.4375 + 700  # days: beyond 50 years in months
    labels.to_csv(path, index=False)
    with caplog.at_level(logging.WARNING):
        load_cohort(layout, "c0")
    assert "look like days: set time_unit: days" in caplog.text and "labels.csv" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_cohort(_manifest(layout, time_unit="days"), "c0")
    assert "look like" not in caplog.text


def test_pseudo_sites_are_seeded_balanced_and_order_free(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds", "c0", n_cases=21, with_bags=False)
    path = layout.cohort_file("c0", "labels.csv")
    pd.read_csv(path).drop(columns=["site"]).to_csv(path, index=False)
    layout = _manifest(layout, pseudo_sites=3, pseudo_site_seed=7)
    sites = load_cohort(layout, "c0").labels["site"]
    assert sites.value_counts().to_dict() == {"p1": 7, "p2": 7, "p3": 7}
    ids = pd.Series(sites.index)
    shuffled = pseudo_site_labels(ids.sample(frac=1.0, random_state=1), "c0", 3, 7)
    assert dict(zip(ids.sample(frac=1.0, random_state=1), shuffled, strict=True)) == sites.to_dict()
    other = pseudo_site_labels(ids, "c0", 3, 8)
    assert list(other) != list(sites)  # the seed matters
    named = {s.name for s in build_sites(layout, {"partition": "site"})}
    assert named == {"c0-p1", "c0-p2", "c0-p3"}


def test_folder_overrides_without_plus_and_merged_key_by_key(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds", "c0")
    _manifest(layout, groups={"path": "groups/pathways.csv", "kind": "compositions", "min_genes": 2})
    cfg = load_config(
        "data_check",
        [
            "data=folder",
            f"data.root={layout.root}",
            "data.groups.path=groups/other.csv",
            "data.transform.method=rank",
            "data.strong=clinical",
            "data.features=null",
        ],
    )
    loaded = DatasetLayout.load(cfg.data)
    assert loaded.groups is not None
    assert (loaded.groups.path, loaded.groups.kind, loaded.groups.min_genes) == (
        "groups/other.csv",
        "compositions",
        2,
    )  # siblings of the overridden key kept
    assert loaded.transform == {"method": "rank"} and loaded.strong == "clinical" and loaded.features is None
    assert loaded.cohorts == ("c0",) and loaded.tables["rna"].parts[0].path == "rna.csv.gz"


def test_folder_without_root_names_the_setting() -> None:
    cfg = load_config("data_check", ["data=folder"])
    with pytest.raises(LayoutError, match=r"data\.root=DIR"):
        DatasetLayout.load(cfg.data)


def test_optional_clinical_part_uses_what_each_cohort_has(tmp_path: Path) -> None:
    from fedprog.data import TabularTransform

    write_cohort(tmp_path / "ds", "c0", with_bags=False)
    layout = write_cohort(tmp_path / "ds", "c1", with_bags=False, seed=1)
    c0 = load_cohort(layout, "c0")
    pd.DataFrame({"case_id": c0.case_ids, "stage": ["I", "II"] * 10}).to_csv(
        layout.cohort_file("c0", "clin.csv"), index=False
    )
    part = {"path": "clin.csv", "columns": ["stage"], "categorical": ["stage"], "missing": "keep"}
    clinical = [{"path": "labels.csv", "columns": ["age"], "duplicates": "identical"}]
    with pytest.raises(LayoutError, match=r"optional: true needs"):
        _manifest(
            layout,
            tables={"clinical": [*clinical, {**part, "path": "x.csv", "optional": True, "missing": "error"}]},
        )
    layout = _manifest(
        layout,
        tables={"clinical": [*clinical, {**part, "optional": True}]},
        expression=None,
        strong="clinical",
        features=None,
        groups=None,
    )
    tables = {name: load_cohort(layout, name).tables["clinical"] for name in ("c0", "c1")}
    assert list(tables["c1"].columns) == ["age", "stage"] and tables["c1"]["stage"].isna().all()
    encoded = TabularTransform(["stage"]).fit(pd.concat(tables.values()))
    assert "stage=<missing>" in encoded.feature_names
    with pytest.raises(Exception, match=r"clin\.csv not found"):
        load_cohort(_manifest(layout, tables={"clinical": [*clinical, part]}), "c1")


def test_gene_map_turns_probes_into_genes(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds", "c0", n_genes=6, with_bags=False)
    path = layout.cohort_file("c0", "rna.csv.gz")
    rna = pd.read_csv(path)
    probes = rna.rename(columns={f"G00{i}": f"p{i}" for i in range(6)})
    probes["p0b"] = probes["p0"] + 2.0  # a second probe of G000
    probes.to_csv(path, index=False)
    mapping = pd.DataFrame(
        {"probe": [*(f"p{i}" for i in range(5)), "p0b"], "gene": [*(f"G00{i}" for i in range(5)), "G000"]}
    )
    mapping.to_csv(layout.root / "probes.csv", index=False)
    expression = load_cohort(_manifest(layout, gene_map={"path": "probes.csv"}), "c0").tables["rna"]
    assert list(expression.columns) == ["G000", "G001", "G002", "G003", "G004", "p5"]  # p5 unmapped: kept
    np.testing.assert_allclose(expression["G000"].to_numpy(), rna["G000"].to_numpy() + 1.0)  # probes averaged
    np.testing.assert_allclose(expression["G003"].to_numpy(), rna["G003"].to_numpy())
    with pytest.raises(LayoutError, match=r"gene_map: unknown key"):
        _manifest(layout, gene_map={"path": "probes.csv", "probes": "x"})


def test_missing_tcga_folder_names_the_settings(tmp_path: Path) -> None:
    from fedprog.data import CohortError

    layout = DatasetLayout.load(load_config("data_check", ["data=tcga", f"shared={tmp_path / 'none'}"]).data)
    with pytest.raises(CohortError, match=r"data\.root=DIR.*FEDPROG_SHARED"):
        load_cohort(layout, "brca")


def test_pseudo_sites_never_replace_tss_barcodes(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds", "c0", with_bags=False)
    sites = load_cohort(_manifest(layout, site_column="tss", pseudo_sites=2), "c0").labels["site"]
    assert set(sites) == {"A1", "B2", "C3"}
