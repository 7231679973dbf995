"""End-to-end: `fedprog simulate` in Flower's simulation runtime (Ray), and the local/pooled baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fed_helpers import tiny_config

from fedprog.data import SiteError
from fedprog.federated import simulation


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sim") / "synth"
    simulation.prepare(tiny_config(root, root.parent / "unused"))
    return root


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_flower_simulation_end_to_end(data_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    assert simulation.main(tiny_config(data_root, out, "strategy=fedprox")) == 0
    assert "held-out C-index" in capsys.readouterr().out
    for name in (
        "results.json",
        "rounds.csv",
        "report.md",
        "config.yaml",
        "cindex_rounds.png",
        "km_c1-B1.png",
        "final_weights.npz",
        "checkpoints/round-0002/weights.npz",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["strategy"] == "fedprox"
    assert results["schema"] == {"name": "fedprog.results", "version": 1, "command": "simulate"}
    rounds = pd.read_csv(out / "rounds.csv")
    assert set(rounds["site"]) == {"c0-A1", "c0-A2", "c1-B1", "c1-B2"}
    assert set(rounds.loc[rounds.site == "c1-B1", "role"]) == {"holdout"}
    assert "Kaplan-Meier" in (out / "report.md").read_text()


@pytest.mark.parametrize("strategy", ["local", "pooled"])
def test_baselines_write_the_same_outputs(data_root: Path, tmp_path: Path, strategy: str):
    out = tmp_path / strategy
    assert simulation.main(tiny_config(data_root, out, f"strategy={strategy}")) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    n_models = 3 if strategy == "local" else 1
    assert len(rounds) == 4 * n_models and rounds["model"].nunique() == n_models
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["headline"]["heldout_c_index"])
    assert (out / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_secagg_through_the_server_app_matches_plain_fedavg(data_root: Path, tmp_path: Path):
    """privacy=secagg in Flower's simulation runtime: training sites only, every site evaluates, and the
    global model equals plain FedAvg's (same client seeds) within SecAgg+'s quantisation error."""
    from fed_helpers import DirectGrid

    from fedprog.federated import client_app
    from fedprog.federated.server_app import run_federation

    secagg = (
        "privacy=secagg",
        "privacy.secagg.max_weight=100.0",  # tight bound on num-examples: finer weights
        "privacy.secagg.quantization_range=268435456",  # 2**28 levels (3 sites sum below the 2**32 modulus)
    )
    out = tmp_path / "secagg"
    assert simulation.main(tiny_config(data_root, out, "training.lr=5e-3", *secagg)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["privacy"] == {"mode": "secagg"}
    assert [r["accepted"] for r in results["rounds"]] == [["c0-A1", "c0-A2", "c1-B2"]] * 2  # not c1-B1
    rounds = pd.read_csv(out / "rounds.csv")
    assert sorted(rounds["round"].unique()) == [1, 2] and "c1-B1" in set(rounds["site"])
    assert (out / "checkpoints" / "round-0002" / "state.json").is_file()

    client_app.clear_caches()
    plain = tmp_path / "plain"
    run_federation(DirectGrid(4), simulation.prepare(tiny_config(data_root, plain, "training.lr=5e-3")))
    with np.load(out / "final_weights.npz") as a, np.load(plain / "final_weights.npz") as b:
        with np.load(plain / "checkpoints" / "round-0000" / "weights.npz") as init:
            diff = max(float(np.abs(a[k].astype(float) - b[k].astype(float)).max()) for k in b.files)
            moved = max(float(np.abs(b[k].astype(float) - init[k].astype(float)).max()) for k in b.files)
    # per round: 3 sites * 2 * clipping_range / quantization_range / sum(num-examples / max_weight) ~ 4e-7
    assert diff < 1e-5 and moved > 100 * diff


def test_sites_below_their_disclosure_minimums_are_refused_before_start_up(tmp_path: Path, capsys) -> None:
    small = ("data.synth.n_patients=[40,16]",)  # c1's two hospitals: 8 cases each (< min_cases 10)
    assert simulation.main(tiny_config(tmp_path / "synth", tmp_path / "out", *small)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, before Ray starts
    assert "2 of 4 site(s)" in line and "min_cases=10" in line and "c1-B1 (8 cases" in line
    assert "federation=per_cohort" in line and not (tmp_path / "out" / "results.json").exists()
    merged = tiny_config(
        tmp_path / "synth", tmp_path / "out2", *small, "federation=per_cohort", "heldout=[c1]"
    )
    simulation.check_site_sizes(simulation.prepare(merged))  # one hospital per cohort: 16 cases each side
    split = tiny_config(  # c0's 40 cases: a 0.8 validation split leaves 8 training cases (< min_cases 10)
        tmp_path / "synth",
        tmp_path / "out3",
        *small,
        "federation=per_cohort",
        "heldout=[c1]",
        "federation.val_fraction=0.8",
    )
    with pytest.raises(SiteError, match=r"c0 \(8 cases.*lower federation.val_fraction=0.8"):
        simulation.check_site_sizes(simulation.prepare(split))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("modules=cade", "model.cade.mode=foo"), "model.cade.mode='foo'; choose one of"),
        (("model.name=nosuch",), "unknown model.name='nosuch'"),
        (("model=snn", "modules=cade"), "use modules=none with this model"),  # known once the data is
        (("model=linear_cox",), "linear_cox"),  # a table model on WSI bags
    ],
)
def test_model_settings_a_server_or_site_would_refuse_are_refused_before_start_up(
    data_root: Path, tmp_path: Path, capsys, overrides: tuple[str, ...], message: str
) -> None:
    from fed_helpers import TINY_DATA

    from fedprog.config import load_config

    data = [f"data.root={data_root}", *TINY_DATA, "heldout=[c1-B1]"]
    assert simulation.main(load_config("simulate", [*data, f"out={tmp_path / 'out'}", *overrides])) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, before Ray starts
    assert message in line
    assert not list((tmp_path / "out").glob("*"))  # nothing written (at most the checked, empty folder)


def test_cade_at_the_input_is_checked_against_the_data_strong_modality() -> None:
    from fedprog.config import load_config
    from fedprog.federated.errors import SettingsError
    from fedprog.federated.settings import check_run_settings

    cfg = load_config("simulate", ["modules=cade", "model.cade.position=input"])
    check_run_settings(cfg)  # the data's strong modality not known yet: the keys are valid
    check_run_settings(cfg, "wsi")
    with pytest.raises(SettingsError, match="position=input re-styles WSI patch features.*'tabular'"):
        check_run_settings(cfg, "tabular")
