"""`fedprog simulate rotation=loco`: one federation per (held-out cancer, seed), rotation.json for compare."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fed_helpers import TINY_DATA, DirectGrid, tiny_config
from omegaconf import OmegaConf

from fedprog import compare
from fedprog.config import load_config, to_container
from fedprog.data import DatasetLayout, build_sites
from fedprog.federated import client_app, rotation, simulation
from fedprog.federated.server_app import run_federation
from fedprog.survival.stats import cindex

THREE_CANCERS = (
    "data.synth.cancers=[c0,c1,c2]",
    "data.synth.n_patients=[40,30,30]",
    "data.synth.survival.weibull_scale=[60.0,40.0,50.0]",
    "data.synth.survival.weibull_shape=[1.2,1.0,1.1]",
    "data.synth.survival.censoring=[0.4,0.5,0.4]",
)
ROTATION = ("rotation=loco", "rotation.targets=[c1,c2]", "rotation.seeds=null", "rotation.n_boot=50")


def rotation_config(data_root: Path, out: Path, *overrides: str):
    return tiny_config(data_root, out, *THREE_CANCERS, "rounds=1", *ROTATION, *overrides, heldout=None)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rot") / "synth"
    rotation.rotation_cohorts(rotation_config(root, root.parent / "unused"))  # generates the data
    return root


def in_process(cfg):
    """simulation.execute without Ray: the same ServerApp/ClientApp code over the in-process DirectGrid."""
    client_app.clear_caches()
    run_federation(DirectGrid(int(cfg.expected_sites)), cfg)
    return json.loads((Path(cfg.out) / "results.json").read_text())


def assert_predictions_are_the_federations(out: Path) -> None:
    """Per held-out site, the C-index of predictions.csv.gz equals the one the site reported (final round)."""
    predictions = pd.read_csv(out / compare.PREDICTIONS_FILE, dtype={"case_id": str})
    for (target, seed), fold in predictions.groupby(["target", "seed"]):
        rounds = pd.read_csv(out / "folds" / f"{target}-s{seed}" / "rounds.csv")
        final = rounds[(rounds["round"] == rounds["round"].max()) & (rounds["role"] == "holdout")]
        assert sorted(final["site"]) == sorted(fold["site"].unique())
        for site, part in fold.groupby("site"):
            recomputed = cindex(*(part[k].to_numpy(float) for k in ("time", "censorship", "risk")))
            reported = final.loc[final["site"] == site]
            assert int(reported["n"].iloc[0]) == len(part)
            assert recomputed == pytest.approx(float(reported["c_index"].iloc[0]), abs=1e-12), site


def test_rotation_in_process_writes_rotation_compare_and_resumes(
    data_root, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.setattr(simulation, "execute", in_process)
    out = tmp_path / "fed"
    with caplog.at_level(logging.INFO, logger="fedprog.federated.rotation"):
        assert simulation.main(rotation_config(data_root, out, "label=fed")) == 0
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fold ")]
    assert len(progress) == 2 and re.match(
        r"fold 2/2: c2 seed 0 -> held-out C-index 0\.\d\d \(\d+ s\)$", progress[1]
    )
    record = json.loads((out / compare.ROTATION_FILE).read_text())
    assert record["setting"]["command"] == "simulate" and record["setting"]["label"] == "fed"
    assert [(f["target"], f["seed"]) for f in record["federation_folds"]] == [("c1", 0), ("c2", 0)]
    for fold in ("c1-s0", "c2-s0"):
        results = json.loads((out / "folds" / fold / "results.json").read_text())
        heldout = OmegaConf.load(out / "folds" / fold / "config.yaml").heldout
        assert results["status"] == "completed" and list(heldout) == [fold[:2]]
    assert_predictions_are_the_federations(out)
    assert "Leave-one-cancer-out (federated)" in (out / "report.md").read_text()

    central = tmp_path / "central"  # the centralized rotation on the same data, targets, seeds and patients
    tiny = ("training.epochs=1", "model.dim=16", "model.attn_dim=8", "model.head_hidden=8", "km_plots=false")
    data = (f"data.root={data_root}", *TINY_DATA, *THREE_CANCERS)
    train = load_config(
        "train", [*data, f"out={central}", *ROTATION, "rotation.seeds=[0]", *tiny, "label=central"]
    )
    from fedprog.protocol import main as train_main

    assert train_main(train) == 0
    assert compare.main([str(out), str(central), "--out", str(tmp_path / "cmp"), "--n-boot", "50"]) == 0
    paired = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["paired"]
    assert [p["target"] for p in paired] == ["c1", "c2", "overall"] and (
        tmp_path / "cmp" / "forest.png"
    ).is_file()

    def must_not_run(cfg):
        raise AssertionError(f"completed fold {cfg.out} ran again")

    monkeypatch.setattr(simulation, "execute", must_not_run)  # same out=: completed folds are skipped
    before = pd.read_csv(out / compare.PREDICTIONS_FILE)
    capsys.readouterr()
    assert simulation.main(rotation_config(data_root, out, "label=fed")) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / compare.PREDICTIONS_FILE), before)


def assert_refused_before_start_up(cfg, capsys, expected: str) -> None:
    """``fedprog simulate`` exits 2 with one stderr line holding ``expected`` and makes no run folder."""
    assert simulation.main(cfg) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert expected in line and not Path(str(cfg.out)).exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("resume=somewhere", "resume=somewhere with rotation=loco"),
        ("heldout=[c0]", 'heldout=["c0"] with rotation=loco'),
        ("strategy=local", "strategy=local with rotation=loco"),
        ("rotation.targets=[c1,c22]", "'c22' is not a cohort of the dataset (nearest: 'c2'"),
        ("strategy=newton", "strategy=newton: model.name='survpath': needs model=linear_cox"),
    ],
)
def test_rotation_refusals_are_one_line_before_start_up(data_root, tmp_path, capsys, override, expected):
    assert_refused_before_start_up(rotation_config(data_root, tmp_path / "out", override), capsys, expected)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rotation_through_flower_simulation_end_to_end(data_root, tmp_path):
    out = tmp_path / "ray"
    assert simulation.main(rotation_config(data_root, out)) == 0
    record = json.loads((out / compare.ROTATION_FILE).read_text())
    assert record["setting"]["label"] == "fedavg+survpath+none"
    assert_predictions_are_the_federations(out)
    assert np.isfinite([row["c_index"] for row in record["summary"]]).all()


def test_a_stopped_fold_resumes_from_its_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "fed"

    def stops_in_c2(cfg):
        results = in_process(cfg)
        if "c2-s0" in str(cfg.out):  # the run stopped after its checkpoint (e.g. too few training sites)
            path = Path(cfg.out) / "results.json"
            path.write_text(json.dumps({**results, "status": "stopped"}))
            return None
        return results

    monkeypatch.setattr(simulation, "execute", stops_in_c2)
    assert simulation.main(rotation_config(data_root, out)) == 1
    assert "rotation stopped at fold 2/2 (c2 seed 0" in capsys.readouterr().err
    assert not (out / compare.ROTATION_FILE).exists()

    resumed: list[str] = []

    def records_resume(cfg):
        resumed.append(str(cfg.get("resume")))
        return in_process(cfg)

    monkeypatch.setattr(simulation, "execute", records_resume)
    assert simulation.main(rotation_config(data_root, out)) == 0
    assert resumed == [str(out / "folds" / "c2-s0")]  # c1 was not run again; c2 continued from its checkpoint
    assert_predictions_are_the_federations(out)


SELECT = (
    "federation=per_cohort",  # one hospital per cancer: each keeps 10+ cases and 3+ events in both splits
    "rotation.targets=[c1]",
    "rotation.select.key=training.lr",
    "rotation.select.values=[1.0e-5,1.0e-2]",
    "rotation.select.val_fraction=0.4",
)


def test_select_chooses_per_fold_on_source_validation_splits_only(data_root, tmp_path, monkeypatch):
    monkeypatch.setattr(simulation, "execute", in_process)
    out = tmp_path / "fed"
    assert simulation.main(rotation_config(data_root, out, *SELECT)) == 0
    record = json.loads((out / compare.ROTATION_FILE).read_text())
    assert "training.lr in [1e-05, 0.01] on 40% source validation splits" == record["setting"]["select"]
    (fold,) = record["federation_folds"]
    choice = fold["selected"]
    scores = choice["source_val_c_index"]
    assert set(scores) == {"1e-05", "0.01"} and choice["key"] == "training.lr"
    assert str(choice["value"]) == max(scores, key=scores.get)  # the best source-validation C-index wins
    assert fold["folder"] == f"folds/c1-s0/training.lr={choice['value']}"
    for value, score in scores.items():  # each candidate: its training sites evaluated their validation cases
        run = out / "folds" / "c1-s0" / f"training.lr={value}"
        saved = OmegaConf.load(run / "config.yaml")
        layout = DatasetLayout.load(to_container(saved.data))
        assert saved.training.lr == float(value) and saved.federation.val_fraction == 0.4
        assert saved.federation.val_seed == 0 and list(saved.heldout) == ["c1"]
        rounds = pd.read_csv(run / "rounds.csv")
        final = rounds[(rounds["round"] == rounds["round"].max()) & (rounds["role"] == "train")]
        held_back = {s.name: len(s.test_ids) for s in build_sites(layout, saved.federation, ["c1"])}
        assert held_back["c1"] == 0 and 0 < held_back["c0"] <= 17 and 0 < held_back["c2"] <= 13
        evaluated = dict(zip(final["site"], final["n"], strict=True))
        assert evaluated == {"c0": held_back["c0"], "c2": held_back["c2"]}
        results = json.loads((run / "results.json").read_text())
        assert results["headline"]["train_c_index"] == pytest.approx(score)
        assert "their 40% validation splits" in (run / "report.md").read_text()
    predictions = pd.read_csv(out / compare.PREDICTIONS_FILE, dtype={"case_id": str})
    chosen = pd.read_csv(out / fold["folder"] / "rounds.csv")
    final = chosen[(chosen["round"] == chosen["round"].max()) & (chosen["role"] == "holdout")]
    assert len(predictions) == int(final["n"].sum()) == 30  # every c1 patient, from the chosen candidate
    assert "source validation splits" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rotation.select.key=training.nope", "rotation.select.key='training.nope' is not a key"),
        ("rotation.select.values=[0.1]", "rotation.select.values=[0.1]: list two or more candidates"),
        ("rotation.select.val_fraction=0", "rotation.select.val_fraction=0: choose a share in (0, 1)"),
    ],
)
def test_select_refusals_are_one_line_before_start_up(data_root, tmp_path, capsys, override, expected):
    cfg = rotation_config(data_root, tmp_path / "out", *SELECT, override)
    assert_refused_before_start_up(cfg, capsys, expected)


BEST_ROUND = (
    "federation=per_cohort",  # one hospital per cancer: each keeps 10+ cases and 3+ events in both splits
    "rotation.targets=[c1]",
    "rounds=3",
    "rotation.keep_round=best",
    "rotation.round_val_fraction=0.4",
)


def _role_c_index(rows: pd.DataFrame, role: str) -> float:
    """Event-weighted mean C-index of one role's rows (the federation's aggregation), computed here."""
    part = rows[rows["role"] == role]
    return float(np.average(part["c_index"], weights=part["n_events"]))


def test_best_round_keeps_the_global_model_of_the_best_source_validation_round(
    data_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(simulation, "execute", in_process)
    out = tmp_path / "fed"
    assert simulation.main(rotation_config(data_root, out, *BEST_ROUND)) == 0
    record = json.loads((out / compare.ROTATION_FILE).read_text())
    assert "best source validation C-index on 40% validation splits" in record["setting"]["keep_round"]
    (fold,) = record["federation_folds"]
    rounds = pd.read_csv(out / "folds" / "c1-s0" / "rounds.csv")
    scores = {r: _role_c_index(rows, "train") for r, rows in rounds.groupby("round")}
    assert sorted(scores) == [1, 2, 3]
    kept = fold["kept_round"]
    assert kept["round"] == max(scores, key=scores.get)  # chosen on the training sites' validation splits
    assert kept["source_val_c_index"] == pytest.approx(scores[kept["round"]])
    saved = OmegaConf.load(out / "folds" / "c1-s0" / "config.yaml")
    assert saved.federation.val_fraction == 0.4 and saved.federation.val_seed == 0
    # the predictions come from the kept round's global model: the C-index the held-out site reported then
    predictions = pd.read_csv(out / compare.PREDICTIONS_FILE, dtype={"case_id": str})
    chosen = rounds[(rounds["round"] == kept["round"]) & (rounds["role"] == "holdout")]
    assert len(predictions) == int(chosen["n"].sum()) == 30
    recomputed = cindex(*(predictions[k].to_numpy(float) for k in ("time", "censorship", "risk")))
    assert recomputed == pytest.approx(float(chosen["c_index"].iloc[0]), abs=1e-12)
    assert fold["federation_heldout_c_index"] == pytest.approx(float(chosen["c_index"].iloc[0]))
    # any round's checkpoint gives the held-out C-index reported in that round
    first = rotation.heldout_predictions(saved, "c1", 0, server_round=1)
    round_1 = rounds[(rounds["round"] == 1) & (rounds["role"] == "holdout")]["c_index"].iloc[0]
    assert cindex(*(first[k].to_numpy(float) for k in ("time", "censorship", "risk"))) == pytest.approx(
        round_1
    )
    assert "best source validation C-index" in (out / "report.md").read_text()
    # last_round/: the same federations' final models, paired with the kept rounds by fedprog compare
    last = pd.read_csv(out / "last_round" / compare.PREDICTIONS_FILE, dtype={"case_id": str})
    final = rounds[(rounds["round"] == 3) & (rounds["role"] == "holdout")]["c_index"].iloc[0]
    assert cindex(*(last[k].to_numpy(float) for k in ("time", "censorship", "risk"))) == pytest.approx(final)
    paired = compare.compare([out / "last_round", out], tmp_path / "cmp", n_boot=50)["paired"]
    overall = paired[paired["target"] == "overall"].iloc[0]
    assert overall["difference"] == pytest.approx(recomputed - final, abs=1e-9)


def test_best_round_picks_the_earliest_of_equal_scores_and_skips_unscored_rounds():
    rows = [
        (1, "a", "train", float("nan"), 5),
        (1, "t", "holdout", 0.50, 9),
        (2, "a", "train", 0.70, 5),
        (2, "b", "train", 0.60, 5),
        (2, "t", "holdout", 0.61, 9),
        (3, "a", "train", 0.60, 5),
        (3, "b", "train", 0.70, 5),
        (3, "t", "holdout", 0.62, 9),
    ]
    rounds = pd.DataFrame(rows, columns=["round", "site", "role", "c_index", "n_events"])
    rounds = rounds.assign(n=10, loss=1.0, c_index_ipcw=rounds["c_index"])
    kept = rotation.best_round(rounds)
    assert kept == {
        "round": 2,
        "source_val_c_index": pytest.approx(0.65),
        "heldout_c_index": pytest.approx(0.61),
    }
    assert rotation.best_round(rounds[rounds["round"] == 1]) is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rotation.keep_round=first", "rotation.keep_round='first': choose last or best"),
        ("rotation.round_val_fraction=0", "rotation.round_val_fraction=0: choose a share in (0, 1)"),
        ("checkpoint.keep=1", "rotation.keep_round=best needs every round's checkpoint: checkpoint.keep=1"),
        ("rotation.select.key=training.lr", "rotation.keep_round=best with rotation.select: choose one"),
    ],
)
def test_best_round_refusals_are_one_line_before_start_up(data_root, tmp_path, capsys, override, expected):
    extra = ["rotation.select.values=[0.1,0.2]"] if override.startswith("rotation.select") else []
    cfg = rotation_config(data_root, tmp_path / "out", *BEST_ROUND, override, *extra)
    assert_refused_before_start_up(cfg, capsys, expected)


def test_a_rotation_refuses_folds_run_with_another_validation_split(data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(simulation, "execute", in_process)
    out = tmp_path / "fed"
    last = [o for o in BEST_ROUND if not o.startswith("rotation.")] + ["rotation.targets=[c1]"]
    assert simulation.main(rotation_config(data_root, out, *last)) == 0  # keep_round=last: no split
    capsys.readouterr()
    assert simulation.main(rotation_config(data_root, out, *BEST_ROUND)) == 1  # same out=, asks for a split
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "that fold ran with federation.val_fraction=0" in line and "needs 0.4; give a new out=" in line
