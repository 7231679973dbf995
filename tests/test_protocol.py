import json

import numpy as np
import pytest
from data_factory import write_cohort

from fedprog.config import load_config
from fedprog.data import DatasetLayout, load_cohorts
from fedprog.protocol import main, modules_label, split_cases, summarize


@pytest.fixture()
def dataset(tmp_path):
    write_cohort(tmp_path / "data", "c0", n_cases=24, seed=0)
    write_cohort(tmp_path / "data", "c1", n_cases=16, seed=1)
    return tmp_path / "data"


def protocol_cfg(root, out, *extra):
    return load_config(
        "train",
        [
            "data=folder",
            f"data.root={root}",
            "model.dim=16",
            "training.epochs=2",
            "training.grad_accum=4",
            "seeds=[0,1]",
            "n_bins=2",
            f"out={out}",
            *extra,
        ],
    )


def test_split_is_stratified_disjoint_and_seeded(dataset):
    cohort = load_cohorts(DatasetLayout.load(dataset))["c0"]
    train_a, val_a = split_cases(cohort, 0.25, seed=3)
    train_b, val_b = split_cases(cohort, 0.25, seed=3)
    assert (train_a, val_a) == (train_b, val_b)
    assert not set(train_a) & set(val_a)
    assert sorted(train_a + val_a) == sorted(cohort.case_ids)
    events = cohort.labels["censorship"] == 0
    assert events.loc[val_a].sum() >= 1


def test_modules_label():
    assert modules_label({"sdir": {"enabled": True}, "cade": {"enabled": True}}) == "SDIR+CADE"
    assert modules_label({"sdir": {"enabled": False}, "cade": {"enabled": True}}) == "CADE"
    assert modules_label({}) == "none"


def test_train_command_writes_results_and_report(dataset, tmp_path):
    cfg = protocol_cfg(dataset, tmp_path / "runs", "modules=sdir_cade")
    assert main(cfg) == 0
    run = tmp_path / "runs"  # out= names the run folder itself
    results = json.loads((run / "results.json").read_text())
    records = results["records"]
    # 2 sources x 2 seeds x (in-domain + 1 target)
    assert len(records) == 8
    assert {r["modules"] for r in records} == {"SDIR+CADE"}
    assert {(r["source"], r["target"]) for r in records if r["split"] == "target"} == {
        ("c0", "c1"),
        ("c1", "c0"),
    }
    assert all(0.0 <= r["c_index"] <= 1.0 for r in records)
    report = (run / "report.md").read_text()
    assert "Cross-cancer C-index" in report
    assert list(run.glob("km_*.png"))
    assert (run / "config.yaml").is_file()


def test_summary_averages_over_seeds():
    records = [
        {
            "backbone": "snn",
            "modules": "none",
            "source": "a",
            "target": "b",
            "split": "target",
            "seed": s,
            "c_index": c,
            "c_index_ipcw": c,
            "ibs": 0.2,
            "oracle_c_index": np.nan,
        }
        for s, c in enumerate([0.6, 0.7])
    ]
    summary = summarize(records)
    assert summary.loc[0, "c_index"] == pytest.approx(0.65)
    assert summary.loc[0, "seeds"] == 2
