"""Loading and validating cohorts: every bad input raises an error naming its culprit."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from data_factory import write_cohort

from fedprog.data import (
    CohortError,
    DatasetLayout,
    DuplicateCaseError,
    GeneMismatchError,
    InvalidValueError,
    LayoutError,
    MissingColumnError,
    MissingFeaturesError,
    load_cohort,
    load_cohorts,
)
from fedprog.data.cohort import require_columns, tss_code
from fedprog.data.harmonize import feature_genes


@pytest.fixture
def layout(tmp_path: Path) -> DatasetLayout:
    return write_cohort(tmp_path / "ds", seed=1)


def _labels(layout: DatasetLayout, cohort: str = "c0") -> tuple[Path, pd.DataFrame]:
    path = layout.cohort_file(cohort, "labels.csv")
    return path, pd.read_csv(path)


def _set_manifest(layout: DatasetLayout, **keys: object) -> DatasetLayout:
    path = layout.root / "fedprog.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest.update(keys)
    path.write_text(yaml.safe_dump(manifest))
    return DatasetLayout.load(layout.root)


def test_load_valid_cohort(layout: DatasetLayout) -> None:
    cohort = load_cohort(layout, "c0")
    assert len(cohort) == 20
    assert list(cohort.labels.columns[:4]) == ["survival_months", "censorship", "site", "age"]
    assert cohort.labels["censorship"].dtype == np.int64
    assert cohort.tables["rna"].shape == (20, 12)
    assert list(cohort.tables["rna"].index) == cohort.case_ids
    # every 4th case has two slides: their bags are listed in slide order
    assert [len(cohort.bag_paths[c]) for c in cohort.case_ids[:4]] == [1, 1, 1, 2]
    assert cohort.dropped.empty


def test_tables_are_joined_on_case_id_not_position(layout: DatasetLayout) -> None:
    rna_path = layout.cohort_file("c0", "rna.csv.gz")
    rna = pd.read_csv(rna_path)
    expected = rna.set_index("case_id").loc["TCGA-A1-C00003"].to_numpy()
    rna.iloc[::-1].to_csv(rna_path, index=False)  # reverse the rows
    cohort = load_cohort(layout, "c0")
    np.testing.assert_allclose(cohort.tables["rna"].loc["TCGA-A1-C00003"].to_numpy(), expected)


@pytest.mark.parametrize("column", ["case_id", "survival_months", "censorship"])
def test_missing_label_column_names_file_and_column(layout: DatasetLayout, column: str) -> None:
    path, labels = _labels(layout)
    labels.drop(columns=[column]).to_csv(path, index=False)
    with pytest.raises(MissingColumnError, match=rf"labels\.csv.*missing column.*{column}"):
        load_cohort(layout, "c0")


@pytest.mark.parametrize(
    ("column", "value", "pattern"),
    [
        ("survival_months", "abc", r"survival_months: non-numeric value.*abc.*TCGA-A1-C00002"),
        ("survival_months", np.nan, r"NaN.*survival_months.*TCGA-A1-C00002"),
        ("survival_months", np.inf, r"infinite.*survival_months.*TCGA-A1-C00002"),
        ("survival_months", 0.0, r"survival_months: zero or negative.*TCGA-A1-C00002"),
        ("survival_months", -3.0, r"survival_months: zero or negative.*TCGA-A1-C00002"),
        ("censorship", 2, r"censorship: value.*2.*not in \{0, 1\}.*TCGA-A1-C00002"),
        ("censorship", 0.5, r"censorship.*0\.5.*TCGA-A1-C00002"),
    ],
)
def test_bad_label_values_name_file_column_case(
    layout: DatasetLayout, column: str, value: object, pattern: str
) -> None:
    path, labels = _labels(layout)
    labels[column] = labels[column].astype(object)
    labels.loc[labels["case_id"] == "TCGA-A1-C00002", column] = value
    labels.to_csv(path, index=False)
    with pytest.raises(InvalidValueError, match=pattern) as info:
        load_cohort(layout, "c0")
    assert str(path) in str(info.value)


def test_censorship_written_as_floats_is_parsed(layout: DatasetLayout) -> None:
    path, labels = _labels(layout)
    labels["censorship"] = labels["censorship"].map(lambda v: f"{v:.1f}")
    labels.to_csv(path, index=False)
    cohort = load_cohort(layout, "c0")
    assert set(cohort.labels["censorship"]) <= {0, 1}


def test_duplicate_case_slide_pair(layout: DatasetLayout) -> None:
    path, labels = _labels(layout)
    pd.concat([labels, labels.iloc[[2]]]).to_csv(path, index=False)
    with pytest.raises(DuplicateCaseError, match=r"labels\.csv.*\(TCGA-A1-C00002, TCGA-A1-C00002-DX1\)"):
        load_cohort(layout, "c0")


def test_duplicate_case_without_slide_column(layout: DatasetLayout) -> None:
    path, labels = _labels(layout)
    labels.drop(columns=["slide_id"]).to_csv(path, index=False)  # cases with 2 slide rows become duplicates
    with pytest.raises(
        DuplicateCaseError, match=r"labels\.csv, column case_id: duplicate case id.*TCGA-A1-C00003"
    ):
        load_cohort(layout, "c0")


def test_slide_rows_with_conflicting_labels(layout: DatasetLayout) -> None:
    path, labels = _labels(layout)
    rows = labels.index[labels["case_id"] == "TCGA-A1-C00003"]
    labels.loc[rows[1], "survival_months"] = 99.0
    labels.to_csv(path, index=False)
    with pytest.raises(InvalidValueError, match=r"TCGA-A1-C00003.*disagree"):
        load_cohort(layout, "c0")


def test_duplicate_case_in_molecular_table(layout: DatasetLayout) -> None:
    rna_path = layout.cohort_file("c0", "rna.csv.gz")
    rna = pd.read_csv(rna_path)
    pd.concat([rna, rna.iloc[[5]]]).to_csv(rna_path, index=False)
    with pytest.raises(
        DuplicateCaseError, match=r"rna\.csv\.gz, column case_id: duplicate case id.*TCGA-A1-C00005"
    ):
        load_cohort(layout, "c0")


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("x1", r"rna\.csv\.gz, column G004: non-numeric.*x1.*TCGA-A1-C00007"),
        (np.nan, r"NaN.*G004.*TCGA-A1-C00007"),
    ],
)
def test_bad_expression_value(layout: DatasetLayout, value: object, pattern: str) -> None:
    rna_path = layout.cohort_file("c0", "rna.csv.gz")
    rna = pd.read_csv(rna_path)
    rna["G004"] = rna["G004"].astype(object)
    rna.loc[7, "G004"] = value
    rna.to_csv(rna_path, index=False)
    with pytest.raises(InvalidValueError, match=pattern):
        load_cohort(layout, "c0")


def test_labels_without_features_are_dropped_and_reported(
    layout: DatasetLayout, caplog: pytest.LogCaptureFixture
) -> None:
    rna_path = layout.cohort_file("c0", "rna.csv.gz")
    pd.read_csv(rna_path).drop(index=[1]).to_csv(rna_path, index=False)
    (layout.cohort_dir("c0") / "features" / "TCGA-B2-C00012-DX1.pt").unlink()
    with caplog.at_level(logging.WARNING):
        cohort = load_cohort(layout, "c0")
    assert len(cohort) == 18
    reasons = dict(zip(cohort.dropped["case_id"], cohort.dropped["reason"], strict=True))
    assert "no row in table 'rna'" in reasons["TCGA-A1-C00001"]
    assert "missing bag file features/TCGA-B2-C00012-DX1" in reasons["TCGA-B2-C00012"]
    assert "dropped 2 of 20" in caplog.text


def test_on_missing_error(layout: DatasetLayout) -> None:
    (layout.cohort_dir("c0") / "features" / "TCGA-B2-C00012-DX1.pt").unlink()
    strict = _set_manifest(layout, on_missing="error")
    with pytest.raises(MissingFeaturesError, match=r"cohort 'c0'.*TCGA-B2-C00012: missing bag file"):
        load_cohort(strict, "c0")


def test_nothing_left_is_an_error(layout: DatasetLayout) -> None:
    rna_path = layout.cohort_file("c0", "rna.csv.gz")
    rna = pd.read_csv(rna_path)
    rna["case_id"] = "X" + rna["case_id"]
    rna.to_csv(rna_path, index=False)
    with pytest.raises(MissingFeaturesError, match=r"cohort 'c0': no case left"):
        load_cohort(layout, "c0")


def test_missing_table_file_names_it(layout: DatasetLayout) -> None:
    layout.cohort_file("c0", "rna.csv.gz").unlink()
    with pytest.raises(CohortError, match=r"c0/rna\.csv\.gz not found"):
        load_cohort(layout, "c0")


def test_missing_features_folder(layout: DatasetLayout) -> None:
    for f in (layout.cohort_dir("c0") / "features").iterdir():
        f.unlink()
    (layout.cohort_dir("c0") / "features").rmdir()
    with pytest.raises(MissingFeaturesError, match=r"features folder .*c0/features not found"):
        load_cohort(layout, "c0")


def test_site_from_tss_barcode(layout: DatasetLayout) -> None:
    assert tss_code("TCGA-2F-A9KO") == "2F"
    assert tss_code("bad") is None
    path, labels = _labels(layout)
    labels.drop(columns=["site"]).to_csv(path, index=False)
    cohort = load_cohort(_set_manifest(layout, site_column="tss"), "c0")
    assert cohort.labels.loc["TCGA-B2-C00012", "site"] == "B2"


def test_bad_barcode_for_tss(layout: DatasetLayout) -> None:
    path, labels = _labels(layout)
    labels = labels.drop(columns=["site"])
    labels.loc[labels["case_id"] == "TCGA-A1-C00000", "case_id"] = "case0"
    labels.to_csv(path, index=False)
    with pytest.raises(InvalidValueError, match=r"tissue source site.*case0"):
        load_cohort(_set_manifest(layout, site_column="tss"), "c0")


def test_gene_sets_differing_between_cohorts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = write_cohort(tmp_path / "ds", "c0")
    layout = write_cohort(tmp_path / "ds", "c1", seed=3)
    rna_path = layout.cohort_file("c1", "rna.csv.gz")
    pd.read_csv(rna_path).drop(columns=["G002", "G005"]).to_csv(rna_path, index=False)
    cohorts = load_cohorts(layout)  # each cohort keeps its own genes: no cross-cohort restriction on load
    assert len(cohorts["c0"].genes) == 12 and len(cohorts["c1"].genes) == 10
    genes = {name: c.genes for name, c in cohorts.items()}
    with caplog.at_level(logging.WARNING):
        shared = feature_genes(genes)
    assert "10 shared of 12" in caplog.text and "c1 lacks 2" in caplog.text and "G002" in caplog.text
    assert shared == cohorts["c1"].genes
    with pytest.raises(GeneMismatchError, match=r"10 shared of 12.*c1 lacks 2.*G002.*strict"):
        feature_genes(genes, policy="strict")


def test_layout_errors_name_the_key(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds")
    with pytest.raises(LayoutError, match=r"strong='wsi' needs WSI bags but 'features' is null"):
        DatasetLayout.load({"root": str(layout.root), "features": None})
    with pytest.raises(LayoutError, match=r"strong='nope' is neither"):
        DatasetLayout.load({"root": str(layout.root), "strong": "nope"})
    with pytest.raises(LayoutError, match=r"gene_policy='loose'"):
        DatasetLayout.load({"root": str(layout.root), "gene_policy": "loose"})
    with pytest.raises(LayoutError, match=r"fedprog\.yaml not found"):
        DatasetLayout.load(tmp_path / "empty")


def test_config_keys_override_manifest(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds")
    override = DatasetLayout.load({"root": str(layout.root), "strong": "clinical", "features": None})
    assert override.strong_kind == "tabular" and override.cohorts == ("c0",)
    assert DatasetLayout.from_dict(override.to_dict()) == override


def test_clinical_table_merged_from_two_files(layout: DatasetLayout) -> None:
    extra = pd.DataFrame({"idx": range(20), "case_id": load_cohort(layout, "c0").case_ids})
    extra["stage"] = ["I", "II", np.nan, "III"] * 5
    extra.rename(columns={"idx": ""}).to_csv(layout.cohort_file("c0", "clin.csv"), index=False)
    tables = {
        "rna": {"path": "rna.csv.gz"},
        "clinical": [
            {"path": "labels.csv", "columns": ["age"], "duplicates": "identical"},
            {"path": "clin.csv", "columns": ["stage"], "categorical": ["stage"], "missing": "keep"},
        ],
    }
    merged = _set_manifest(layout, tables=tables, strong="clinical", features=None)
    cohort = load_cohort(merged, "c0")
    assert list(cohort.tables["clinical"].columns) == ["age", "stage"]
    assert cohort.tables["clinical"]["stage"].isna().sum() == 5
    tables["clinical"][1]["missing"] = "drop"
    dropping = _set_manifest(layout, tables=tables, strong="clinical", features=None)
    cohort = load_cohort(dropping, "c0")
    assert len(cohort) == 15 and cohort.dropped["reason"].str.contains("clin.csv column").all()


def test_require_cohort_and_columns_name_the_culprit(layout: DatasetLayout) -> None:
    with pytest.raises(CohortError, match=r"cohort 'nope' is not in the layout's cohorts \['c0'\]"):
        load_cohort(layout, "nope")
    frame = pd.DataFrame({"case_id": ["a"], "T": [1.0]})
    require_columns(frame, ["case_id"], Path("x.csv"))
    with pytest.raises(
        MissingColumnError, match=r"file x\.csv: missing column\(s\) \['E'\] \(found: case_id, T\)"
    ):
        require_columns(frame, ["E", "T"], Path("x.csv"))
