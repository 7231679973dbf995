"""Table cache: same tables from memory and disk, edited files re-read, FEDPROG_CACHE=off, bad entries."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from data_factory import write_cohort

from fedprog.data import cache, load_cohort


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    cache.clear_memory()
    yield folder / "tables"
    cache.clear_memory()


def _clinical_layout(tmp_path: Path):
    layout = write_cohort(tmp_path / "ds", "c0", with_bags=False)
    c0 = pd.read_csv(layout.cohort_file("c0", "labels.csv")).drop_duplicates("case_id")
    stage = pd.Series(["I", "II", None, "III"] * 5, dtype=object)
    pd.DataFrame({"case_id": c0["case_id"].to_numpy(), "stage": stage}).to_csv(
        layout.cohort_file("c0", "s.csv"), index=False
    )
    from dataclasses import replace

    from fedprog.data.layout import TablePart, TableSpec

    parts = (
        TablePart("labels.csv", ("age", "is_female"), duplicates="identical"),
        TablePart("s.csv", ("stage",), categorical=("stage",), missing="keep"),
    )
    return replace(layout, tables={**layout.tables, "clinical": TableSpec("clinical", parts)})


def test_disk_and_memory_hits_equal_a_fresh_read(tmp_path: Path, _cache: Path) -> None:
    layout = _clinical_layout(tmp_path)
    fresh = load_cohort(layout, "c0", tables=["rna", "clinical"])
    assert len(list(_cache.glob("*.npz"))) == 3  # rna, labels part, stage part
    memory = load_cohort(layout, "c0", tables=["rna", "clinical"])
    cache.clear_memory()
    disk = load_cohort(layout, "c0", tables=["rna", "clinical"])
    for other in (memory, disk):
        for name in ("rna", "clinical"):
            pd.testing.assert_frame_equal(other.tables[name], fresh.tables[name])
    assert disk.tables["clinical"]["stage"].isna().sum() == 5


def test_edited_file_is_read_again(tmp_path: Path) -> None:
    layout = write_cohort(tmp_path / "ds", "c0", with_bags=False)
    load_cohort(layout, "c0")
    path = layout.cohort_file("c0", "rna.csv.gz")
    rna = pd.read_csv(path)
    rna.loc[0, "G001"] = 123.0
    rna.to_csv(path, index=False)
    assert load_cohort(layout, "c0").tables["rna"].iloc[0]["G001"] == 123.0


def test_cache_off_writes_nothing(tmp_path: Path, _cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, "off")
    load_cohort(write_cohort(tmp_path / "ds", "c0", with_bags=False), "c0")
    assert not _cache.exists()


def test_corrupt_entry_falls_back_to_the_file(tmp_path: Path, _cache: Path) -> None:
    layout = write_cohort(tmp_path / "ds", "c0", with_bags=False)
    fresh = load_cohort(layout, "c0")
    for entry in _cache.glob("*.npz"):
        entry.write_bytes(b"not a zip")
    cache.clear_memory()
    pd.testing.assert_frame_equal(load_cohort(layout, "c0").tables["rna"], fresh.tables["rna"])
