import json

import numpy as np
import pytest
from data_factory import write_cohort

from fedprog.config import load_config
from fedprog.data import DatasetLayout, load_cohorts
from fedprog.protocol import fit_source, main, modules_label, split_cases, summarize


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
    assert results["schema"] == {"name": "fedprog.results", "version": 1, "command": "train"}
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


def test_val_fraction_zero_trains_on_every_source_case_and_keeps_the_last_epoch(dataset, tmp_path):
    cfg = protocol_cfg(dataset, tmp_path / "runs", "val_fraction=0", "training.select_on=last", "seeds=[0]")
    assert main(cfg) == 0
    records = json.loads((tmp_path / "runs" / "results.json").read_text())["records"]
    assert {r["split"] for r in records} == {"target"}  # no in-domain validation split to score
    assert {r["selected_epoch"] for r in records} == {2}  # the last of training.epochs=2
    assert "Every source case trains (val_fraction=0)" in (tmp_path / "runs" / "report.md").read_text()


def test_refit_scores_targets_with_the_chosen_epochs_trained_on_every_source_case(dataset, tmp_path):
    keys = ("seeds=[0]", "training.epochs=3", "sources=[c0]", "km_plots=false")
    assert main(protocol_cfg(dataset, tmp_path / "plain", *keys)) == 0
    cfg = protocol_cfg(dataset, tmp_path / "refit", *keys, "refit=true")
    assert main(cfg) == 0
    plain, refit = (
        {r["split"]: r for r in json.loads((tmp_path / run / "results.json").read_text())["records"]}
        for run in ("plain", "refit")
    )
    # the in-domain row scores the model the validation split chose, as without refit
    assert refit["in-domain (val)"]["c_index"] == plain["in-domain (val)"]["c_index"]
    assert refit["target"]["selected_epoch"] == plain["target"]["selected_epoch"]
    assert refit["target"]["refit"] and not plain["target"]["refit"]
    # the target row scores a fresh model (same seed) trained on all 24 source cases for that many epochs
    layout = DatasetLayout.load(dataset)
    cohorts = load_cohorts(layout)
    every_case = {"c0": sorted(cohorts["c0"].case_ids)}
    epochs = plain["target"]["selected_epoch"]
    fit = fit_source(cfg, layout, cohorts, every_case, 0, epochs=epochs, select_on="last")
    assert len(fit.train_data) == 24 and fit.history.selected_epoch == epochs
    expected = fit.evaluate(fit.dataset("c1", cohorts["c1"].case_ids)).metrics["c_index"]
    assert refit["target"]["c_index"] == pytest.approx(expected, abs=1e-12)
    assert "refit=true" in (tmp_path / "refit" / "report.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["val_fraction=0"],
            "val_fraction=0 leaves no source validation split for training.select_on=val_c_index",
        ),
        (["val_fraction=1.0", "training.select_on=last"], "val_fraction=1.0: choose a share"),
        (["refit=true", "training.select_on=last"], "refit=true trains again for the epoch chosen"),
        (["refit=true", "training.local_steps=5"], "refit=true counts epochs but training.local_steps=5"),
    ],
)
def test_train_refuses_a_split_it_cannot_select_on(dataset, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        main(protocol_cfg(dataset, tmp_path / "runs", *extra))
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


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
            "transfer_c_index": np.nan,
        }
        for s, c in enumerate([0.6, 0.7])
    ]
    summary = summarize(records)
    assert summary.loc[0, "c_index"] == pytest.approx(0.65)
    assert summary.loc[0, "seeds"] == 2


TINY_SYNTH = [
    "data.synth.cancers=[c0,c1,c2]",
    "data.synth.n_patients=[36,30,30]",
    "data.synth.patches=[4,8]",
    "data.synth.feature_dim=8",
    "data.synth.n_genes=24",
    "data.synth.n_pathways=4",
    "data.synth.survival.weibull_scale=[60.0,40.0,50.0]",
    "data.synth.survival.weibull_shape=[1.2,1.0,1.1]",
    "data.synth.survival.censoring=[0.4,0.4,0.4]",
]


def rotation_cfg(root, out, *extra):
    return load_config(
        "train",
        [
            f"data.root={root}",
            *TINY_SYNTH,
            "rotation=loco",
            "rotation.seeds=[0,1]",
            "rotation.n_boot=200",
            "model=snn",
            "model.dim=8",
            "training.epochs=1",
            "training.grad_accum=8",
            "km_plots=false",
            "n_bins=2",
            f"out={out}",
            *extra,
        ],
    )


def test_rotation_runs_end_to_end_and_compares(tmp_path):
    import pandas as pd

    from fedprog.compare import compare, load_rotation
    from fedprog.data.synth import read_truth, truth_ceilings
    from fedprog.survival.stats import cindex

    root = tmp_path / "synth"
    assert main(rotation_cfg(root, tmp_path / "a", "label=snn-a")) == 0
    assert main(rotation_cfg(root, tmp_path / "b", "label=snn-b", "training.lr=1e-2")) == 0
    run_a, run_b = tmp_path / "a", tmp_path / "b"  # out= is the run folder itself
    record, predictions = load_rotation(run_a)
    truth = read_truth(root)
    # every case of every target, once per seed; sources never include the target (model selection on sources)
    for target in ["c0", "c1", "c2"]:
        cases = truth.index[truth["cohort"] == target]
        for seed in [0, 1]:
            rows = predictions[(predictions["target"] == target) & (predictions["seed"] == seed)]
            assert sorted(rows["case_id"]) == sorted(cases)
    results = json.loads((run_a / "results.json").read_text())["records"]
    transfer = {r["target"]: r["transfer_c_index"] for r in results if r["split"] == "target"}
    assert transfer["c0"] == pytest.approx(
        truth_ceilings(truth, truth.index[truth["cohort"] == "c0"])["transfer_c_index"]
    )
    for r in results:
        if r["split"] == "target":
            assert r["target"] not in r["source"].split("+") and len(r["source"].split("+")) == 2
    summary = pd.DataFrame(record["summary"]).set_index("target")
    assert list(summary.index) == ["c0", "c1", "c2", "overall"]
    for target in ["c0", "c1", "c2"]:
        rows = predictions[predictions["target"] == target]
        per_seed = [cindex(g["time"], g["censorship"], g["risk"]) for _, g in rows.groupby("seed")]
        assert summary.loc[target, "c_index"] == pytest.approx(np.mean(per_seed))
        assert (
            summary.loc[target, "ci_low"] <= summary.loc[target, "c_index"] <= summary.loc[target, "ci_high"]
        )
        expected = truth_ceilings(truth, rows["case_id"].unique())
        assert summary.loc[target, "transfer_c_index"] == pytest.approx(expected["transfer_c_index"])
        assert summary.loc[target, "oracle_c_index"] == pytest.approx(expected["oracle_c_index"])
    folds = pd.DataFrame(record["folds"])
    assert set(folds["site"]) >= {"c0-A1", "c0-A2", "all"}
    assert "Leave-one-cancer-out" in (run_a / "report.md").read_text()

    tables = compare([run_a, run_b], tmp_path / "cmp", n_boot=100)
    paired = tables["paired"].set_index("target")
    settings = tables["settings"].set_index(["setting", "target"])
    for target in ["c0", "c1", "c2"]:
        gap = settings.loc[("snn-b", target), "c_index"] - settings.loc[("snn-a", target), "c_index"]
        assert paired.loc[target, "difference"] == pytest.approx(gap)
    assert paired.loc["overall", "n_pairs"] == 6
    for name in ["comparison.md", "comparison.json", "forest.png"]:
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    assert "Paired differences to `snn-a`" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_compare_refuses_folders_without_rotation_results(tmp_path, capsys):
    from fedprog.compare import CompareError, compare
    from fedprog.compare import main as compare_main

    (tmp_path / "x").mkdir()
    with pytest.raises(CompareError, match="two or more run folders"):
        compare([tmp_path / "x"], tmp_path / "out")
    assert compare_main([str(tmp_path / "x"), str(tmp_path / "x")]) == 2
    assert "x: no rotation.json" in capsys.readouterr().err


def test_train_refuses_the_federated_selection_before_start_up(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        "train",
        [
            f"out={out}",
            "rotation=loco",
            "rotation.select.key=training.lr",
            "rotation.select.values=[0.1,0.2]",
        ],
    )
    with pytest.raises(ValueError, match=r"rotation.select.key=training.lr is for `fedprog simulate"):
        main(cfg)
    assert not out.exists()


def _fake_rotation(out, label, seeds, shift):
    """A rotation folder of two targets x ``seeds`` with risks = -time + noise (+ ``shift`` noise level)."""
    import pandas as pd

    from fedprog.compare import write_rotation

    rng = np.random.default_rng(len(label))
    rows = []
    for target in ["c0", "c1"]:
        times = np.linspace(1.0, 40.0, 30)
        for seed in seeds:
            noise = rng.normal(scale=10.0 + shift, size=times.size)
            for i, t in enumerate(times):
                rows.append((target, seed, f"{target}-A", f"{target}-{i}", t, i % 3 == 0, -t + noise[i]))
    frame = pd.DataFrame(rows, columns=["target", "seed", "site", "case_id", "time", "censorship", "risk"])
    frame["censorship"] = frame["censorship"].astype(int)
    out.mkdir(parents=True)
    write_rotation(out, {"label": label}, frame, n_boot=50)
    return frame


def test_compare_pairs_only_the_requested_seeds(tmp_path):
    from fedprog.cli import main as cli_main
    from fedprog.compare import CompareError, compare
    from fedprog.survival.stats import cindex

    five = _fake_rotation(tmp_path / "five", "base", [0, 1, 2, 3, 4], 0.0)
    two = _fake_rotation(tmp_path / "two", "ablation", [0, 1], 20.0)
    with pytest.raises(CompareError, match=r"two: seeds \[0, 1\] differ .* seeds=\[0,1\]"):  # must agree
        compare([tmp_path / "five", tmp_path / "two"], tmp_path / "cmp", n_boot=50)
    tables = compare([tmp_path / "five", tmp_path / "two"], tmp_path / "cmp", n_boot=50, seeds=[0, 1])
    paired = tables["paired"].set_index("target")
    assert paired.loc["overall", "n_pairs"] == 4  # 2 targets x seeds 0-1, not 5 seeds
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["seeds"] == [0, 1]
    assert "Seeds compared: 0, 1." in (tmp_path / "cmp" / "comparison.md").read_text()
    for target in ["c0", "c1"]:
        per_seed = {
            name: np.mean(
                [
                    cindex(g["time"], g["censorship"], g["risk"])
                    for seed, g in frame[frame["target"] == target].groupby("seed")
                    if seed in (0, 1)
                ]
            )
            for name, frame in (("five", five), ("two", two))
        }
        assert paired.loc[target, "difference"] == pytest.approx(per_seed["two"] - per_seed["five"])
    with pytest.raises(CompareError, match=r"two: no folds for seed\(s\) \[4\]"):
        compare([tmp_path / "five", tmp_path / "two"], tmp_path / "cmp", n_boot=50, seeds=[0, 4])
    # the console script: `fedprog compare A B seeds=[0,1]`
    out = tmp_path / "cli"
    assert (
        cli_main(["compare", str(tmp_path / "five"), str(tmp_path / "two"), "seeds=[0,1]", f"out={out}"]) == 0
    )
    assert (out / "comparison.json").is_file()
