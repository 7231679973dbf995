"""Tests of fedprog.report: NaN-safe JSON, environment info, run folders, config, markdown report, plots."""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from fedprog.report import (
    ReportBuilder,
    ReportError,
    UnsafePathError,
    environment_info,
    markdown_table,
    plot_rounds,
    safe_output_path,
    save_run_config,
    write_json,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class _Summary:
    site: str
    c_index: float


def rounds_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for site, role in (("c0", "train"), ("c1", "train"), ("c3", "holdout")):
        for rnd in range(1, 6):
            rows.append(
                {"round": rnd, "site": site, "role": role, "c_index": 0.5 + 0.03 * rnd + 0.01 * rng.normal()}
            )
    rows[-1]["c_index"] = math.nan  # a round where the metric was undefined
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- JSON


def test_write_json_round_trips_nan_as_null(tmp_path: Path) -> None:
    obj = {
        "c_index": math.nan,
        "ibs": np.float32(0.25),
        "n": np.int64(12),
        "inf": math.inf,
        "flags": np.array([True, False]),
        "curve": np.array([[1.0, np.nan]]),
        "table": pd.DataFrame({"site": ["a", "b"], "c_index": [0.6, np.nan]}),
        "series": pd.Series({"x": 1.5}),
        "path": tmp_path / "x.png",
        "when": dt.datetime(2025, 1, 2, 3, 4, 5),
        "cfg": OmegaConf.create({"a": 1, "b": "${a}"}),
        "summary": _Summary("c0", math.nan),
        7: "int key",
    }
    out = write_json(obj, tmp_path / "deep" / "results.json")
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["c_index"] is None and back["inf"] is None
    assert back["ibs"] == pytest.approx(0.25) and back["n"] == 12
    assert back["flags"] == [True, False] and back["curve"] == [[1.0, None]]
    assert back["table"] == [{"site": "a", "c_index": 0.6}, {"site": "b", "c_index": None}]
    assert back["series"] == {"x": 1.5}
    assert back["path"].endswith("x.png") and back["when"] == "2025-01-02T03:04:05"
    assert back["cfg"] == {"a": 1, "b": 1}
    assert back["summary"] == {"site": "c0", "c_index": None}
    assert back["7"] == "int key"
    assert not list(out.parent.glob("*.partial"))


def test_write_json_rejects_unknown_types_by_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cannot serialise an object of type object"):
        write_json({"x": object()}, tmp_path / "bad.json")


def test_environment_info_has_versions() -> None:
    info = environment_info()
    expected = {"python", "fedprog", "torch", "flwr", "numpy", "pandas", "sksurv", "platform", "device"}
    assert expected <= set(info)
    assert info["numpy"] == np.__version__ and info["pandas"] == pd.__version__
    assert info["device"] == "cpu" or info["device"].startswith("cuda")
    json.dumps(info)


# --------------------------------------------------------------------------------------------- run folders


def test_save_run_config_resolves_and_reloads(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"seed": 3, "out": "runs", "model": {"name": "survpath", "dim": "${seed}"}})
    path = save_run_config(cfg, tmp_path)
    assert path.name == "config.yaml"
    back = OmegaConf.load(path)
    assert back.model.dim == 3 and back.model.name == "survpath"
    assert OmegaConf.load(save_run_config({"plain": [1, 2]}, tmp_path / "b")).plain == [1, 2]


# --------------------------------------------------------------------------------------------- markdown


def test_markdown_table_formats_floats_and_nan() -> None:
    df = pd.DataFrame({"site": ["a|b", "c"], "c_index": [0.61234, math.nan], "n": [10, 20]})
    text = markdown_table(df, floatfmt=2)
    lines = text.splitlines()
    assert lines[0] == "| site | c_index | n |"
    assert lines[1] == "| --- | ---: | ---: |"
    assert lines[2] == "| a\\|b | 0.61 | 10 |"
    assert lines[3] == "| c | n/a | 20 |"


def test_markdown_table_keeps_named_index() -> None:
    df = pd.DataFrame({"c_index": [0.7]}, index=pd.Index(["brca"], name="cohort"))
    assert markdown_table(df).splitlines()[0] == "| cohort | c_index |"


def test_report_builder_writes_table_and_image_link(tmp_path: Path) -> None:
    run = tmp_path / "run"
    png = plot_rounds(rounds_table(), run / "plots" / "rounds.png")
    table = pd.DataFrame({"site": ["c0", "c3"], "c_index": [0.6512, 0.5488]})
    report = (
        ReportBuilder(run, "fedprog run")
        .section("Setup", "Two training sites, one held-out site.")
        .table("Held-out C-index", table)
        .figure("C-index per round", png)
    )
    out = report.write()
    assert out == run / "report.md"
    text = out.read_text()
    assert text.startswith("# fedprog run\n")
    assert "## Held-out C-index" in text
    assert "| c0 | 0.651 |" in text and "| c3 | 0.549 |" in text
    assert "![C-index per round](plots/rounds.png)" in text
    assert text.index("## Setup") < text.index("## Held-out C-index") < text.index("## C-index per round")


def test_report_builder_errors(tmp_path: Path) -> None:
    report = ReportBuilder(tmp_path, "r")
    with pytest.raises(FileNotFoundError, match=r"figure 'KM': image .*missing\.png does not exist"):
        report.figure("KM", tmp_path / "missing.png")
    with pytest.raises(ReportError, match="table 'x': expected a pandas DataFrame, got dict"):
        report.table("x", {"a": [1]})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- plots


def test_plot_rounds_writes_png(tmp_path: Path) -> None:
    out = plot_rounds(rounds_table(), tmp_path / "r.png", title="C-index per round")
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == PNG_MAGIC
    no_role = rounds_table().drop(columns="role")
    assert plot_rounds(no_role, tmp_path / "r2.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_rounds_missing_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"column\(s\) \['ibs'\] not in table; available: \['round'"):
        plot_rounds(rounds_table(), tmp_path / "r.png", value="ibs")
    with pytest.raises(ReportError, match="empty table"):
        plot_rounds(rounds_table().iloc[:0], tmp_path / "r.png")


@pytest.mark.parametrize(
    "name", ["../x.png", "a/b.png", "..", ".hidden", "km_..png", "", "a\x00b", "x" * 101]
)
def test_safe_output_path_refuses_names_that_could_leave_the_folder(tmp_path: Path, name: str):
    with pytest.raises(UnsafePathError):
        safe_output_path(tmp_path, name)


def test_safe_output_path_keeps_plain_names_and_refuses_symlinks_out(tmp_path: Path):
    out = tmp_path / "run"
    out.mkdir()
    assert safe_output_path(out, "km_c1-B1.png") == out.resolve() / "km_c1-B1.png"
    (out / "escape").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="outside the run folder"):
        safe_output_path(out, "escape")
