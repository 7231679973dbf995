"""``fedprog data check``: summary table, one-line errors with exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from data_factory import write_cohort
from omegaconf import OmegaConf

from fedprog.config import config_dir, load_config
from fedprog.data import CohortError, check_dataset
from fedprog.data.check import main, median_followup


def test_summary_numbers(tmp_path: Path) -> None:
    write_cohort(tmp_path / "ds", "c0", n_cases=20)
    layout = write_cohort(tmp_path / "ds", "c1", n_cases=12, seed=2)
    summary = check_dataset(layout)
    frame = summary.to_frame()
    assert frame.loc["total", "cases"] == 32 and frame.loc["c1", "cases"] == 12
    labels = pd.read_csv(layout.cohort_file("c0", "labels.csv")).drop_duplicates("case_id")
    assert frame.loc["c0", "events"] == int((labels["censorship"] == 0).sum())
    assert frame.loc["c0", "bags"] == len(pd.read_csv(layout.cohort_file("c0", "labels.csv")))
    assert (
        frame.loc["c0", "feature_dim"] == 8
        and frame.loc["c0", "genes"] == 12
        and frame.loc["c0", "sites"] == 3
    )
    assert frame.loc["total", "sites"] == 6
    assert 3 <= frame.loc["total", "patches_min"] <= frame.loc["total", "patches_max"] <= 24
    assert "c1" in summary.format()


def test_median_followup_reverse_km() -> None:
    # censoring is the event: reverse KM drops to 0.5 at the 2nd censored time of 4 when no event precedes it
    assert median_followup([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 1]) == 2.0
    assert median_followup([1.0, 2.0], [0, 0]) != median_followup([1.0, 2.0], [0, 0])  # NaN: nothing censored


def test_main_ok_and_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = write_cohort(tmp_path / "ds")
    cfg = OmegaConf.create({"data": {"root": str(layout.root), "cohorts": ["ignored"], "synth": {}}})
    assert main(cfg) == 0  # the generated default's keys never override a manifest
    assert "total" in capsys.readouterr().out
    path = layout.cohort_file("c0", "labels.csv")
    labels = pd.read_csv(path)
    labels.loc[3, "survival_months"] = -1
    labels.to_csv(path, index=False)
    assert main(cfg) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert "labels.csv, column survival_months: zero or negative" in lines[0] and "TCGA-A1-C00003" in lines[0]


def test_main_through_hydra_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (config_dir() / "data" / "synth.yaml").is_file():
        pytest.skip("configs/data/synth.yaml (the synth engineer's) is absent")
    layout = write_cohort(tmp_path / "ds")
    cfg = load_config("data_check", [f"data.root={layout.root}"])
    assert main(cfg) == 0
    assert main(load_config("data_check", [f"data.root={tmp_path / 'missing'}"])) == 2
    assert "missing" in capsys.readouterr().err


def _one_error_line(cfg, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(cfg) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_header_only_labels_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = write_cohort(tmp_path / "ds")
    path = layout.cohort_file("c0", "labels.csv")
    path.write_text(path.read_text().splitlines()[0] + "\n")
    line = _one_error_line(OmegaConf.create({"data": {"root": str(layout.root)}}), capsys)
    assert str(path) in line and "header only" in line


def test_truncated_gzip_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = write_cohort(tmp_path / "ds", n_genes=400, n_cases=60)
    path = layout.cohort_file("c0", "rna.csv.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    line = _one_error_line(OmegaConf.create({"data": {"root": str(layout.root)}}), capsys)
    assert str(path) in line and "unreadable" in line


def test_notes_count_the_genes_each_cohort_lacks(tmp_path: Path) -> None:
    write_cohort(tmp_path / "ds", "c0", n_genes=20)
    layout = write_cohort(tmp_path / "ds", "c1", n_genes=20, seed=2)
    path = layout.cohort_file("c1", "rna.csv.gz")
    pd.read_csv(path).drop(columns=["G001", "G002", "G003"]).to_csv(path, index=False)
    summary = check_dataset(layout)
    assert summary.to_frame()["genes"].to_dict() == {"c0": 20, "c1": 17, "total": 17}
    (note,) = [n for n in summary.notes if n.startswith("c1:")]
    assert "lacks 3 of the 20 genes" in note and "refused" in note  # 15 % > 10 %


def test_add_cohort_registers_a_checked_folder(tmp_path: Path) -> None:
    from fedprog.data.check import add_cohort
    from fedprog.data.layout import DatasetLayout

    root = tmp_path / "ds"
    write_cohort(root, "c0", with_bags=False)
    write_cohort(tmp_path / "other", "ext", with_bags=False, seed=4)  # a new hospital's folder
    shutil.copytree(tmp_path / "other" / "ext", root / "ext")
    labels = pd.read_csv(root / "ext" / "labels.csv").drop(columns=["site"])
    labels["survival_months"] = (labels["survival_months"] * 30.4375).round(1)  # this hospital counts days
    labels.to_csv(root / "ext" / "labels.csv", index=False)
    summary = add_cohort(root, "ext", time_unit="days", pseudo_sites=2)
    assert summary.to_frame().loc["ext", "sites"] == 2
    layout = DatasetLayout.load(root)
    assert layout.cohorts == ("c0", "ext") and layout.cohort_time_unit("ext") == "days"
    assert layout.cohort_time_unit("c0") == "months" and layout.cohort_pseudo_sites("c0") is None
    before = (root / "fedprog.yaml").read_text()
    (root / "bad").mkdir()
    (root / "bad" / "labels.csv").write_text("case_id,survival_months,censorship\n")
    with pytest.raises(CohortError, match=r"header only"):
        add_cohort(root, "bad")
    assert (root / "fedprog.yaml").read_text() == before  # nothing registered on failure


def test_add_main_through_its_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedprog.data.check import add_main

    root = tmp_path / "ds"
    write_cohort(root, "c0", with_bags=False)
    write_cohort(tmp_path / "other", "c1", with_bags=False, seed=4)
    shutil.copytree(tmp_path / "other" / "c1", root / "c1")
    cfg = load_config("data_add", [f"data.root={root}", "cohort=c1"])
    assert add_main(cfg) == 0 and "cohort c1 added" in capsys.readouterr().out
    assert add_main(load_config("data_add", [f"data.root={root}", "cohort=nope"])) == 2
    assert "cohort folder" in capsys.readouterr().err


def test_folder_overrides_apply_over_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layout = write_cohort(tmp_path / "ds")
    ok = load_config("data_check", ["data=folder", f"data.root={layout.root}"])
    assert main(ok) == 0
    capsys.readouterr()
    bad = load_config("data_check", ["data=folder", f"data.root={layout.root}", "data.time_unit=weeks"])
    assert main(bad) == 2 and "time_unit='weeks'" in capsys.readouterr().err


def test_add_starts_a_manifest_from_a_preset(tmp_path: Path, shared_data: Path) -> None:
    from fedprog.data.check import add_cohort
    from fedprog.data.layout import DatasetLayout

    root = tmp_path / "own"
    shutil.copytree(shared_data / "tcga" / "kirp", root / "kirp")  # a cancer the tcga preset does not list
    with pytest.raises(CohortError, match=r"fedprog.yaml not found: start it from a data preset with like="):
        add_cohort(root, "kirp")
    with pytest.raises(CohortError, match=r"like=tcgx: no such data preset; choose one of .*tcga"):
        add_cohort(root, "kirp", like="tcgx")
    summary = add_cohort(root, "kirp", like="tcga")
    assert summary.to_frame().loc["kirp", "cases"] == 260
    layout = DatasetLayout.load(root)
    assert layout.cohorts == ("kirp",) and layout.name == "own" and layout.strong == "clinical"
    hallmarks = shared_data / "tcga" / "signatures" / "hallmarks_signatures.csv"
    assert Path(layout.groups.path) == hallmarks.resolve()  # the preset's groups, referenced where they are
    with pytest.raises(CohortError, match=r"like=tcga: .* exists already"):
        add_cohort(root, "kirp", like="tcga")
