"""The ServerApp's federation loop on an in-process grid: outputs, held-out isolation, robustness, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fed_helpers import DirectGrid, tiny_config
from flwr.app import Error, Message

from fedprog.federated import client_app
from fedprog.federated.server_app import config_from_run_config, run_federation
from fedprog.federated.simulation import prepare
from fedprog.federated.strategy import TooFewSitesError, arrays_to_numpy, numpy_to_arrays

HELDOUT_PARTITION = 2  # c1-B1 in the tiny federation's site table (c0-A1, c0-A2, c1-B1, c1-B2)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed") / "synth"
    prepare(tiny_config(root, root.parent / "unused"))  # generates the tiny dataset once
    return root


def _run(data_root: Path, out: Path, *overrides: str, faults=None):
    client_app.clear_caches()
    cfg = prepare(tiny_config(data_root, out, *overrides))
    grid = DirectGrid(int(cfg.expected_sites), faults)
    return run_federation(grid, cfg), grid


def _weights(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "final_weights.npz") as f:
        return {k: f[k] for k in f.files}


def test_run_writes_outputs_and_heldout_never_trains(data_root: Path, tmp_path: Path):
    results, grid = _run(data_root, tmp_path / "run", "audit.enabled=true")
    out = tmp_path / "run"
    for name in (
        "results.json",
        "rounds.csv",
        "report.md",
        "config.yaml",
        "cindex_rounds.png",
        "km_c1-B1.png",
    ):
        assert (out / name).is_file(), name
    assert ("train", HELDOUT_PARTITION) not in grid.sent
    assert ("evaluate", HELDOUT_PARTITION) in grid.sent
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds.columns[:7]) == ["round", "site", "role", "c_index", "n", "n_events", "loss"]
    assert sorted(rounds["round"].unique()) == [1, 2]
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "completed" and saved["rounds_completed"] == 2
    assert 0.0 <= saved["headline"]["heldout_c_index"] <= 1.0
    assert set(saved["km"]) == {"c1-B1"} and len(saved["km"]["c1-B1"]["km-low"]) == 25
    assert saved["environment"]["flwr"] == "1.42.0"
    events = [json.loads(line)["event"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert {"run_started", "train_sent", "update_accepted", "round_aggregated", "run_finished"} <= set(events)
    assert sorted((out / "checkpoints").iterdir())[-1].name == "round-0002"


def test_heldout_data_never_changes_global_weights(data_root: Path, tmp_path: Path):
    _run(data_root, tmp_path / "a")
    altered = tmp_path / "altered"
    shutil.copytree(data_root, altered)
    labels_path = altered / "c1" / "labels.csv"
    labels = pd.read_csv(labels_path)
    held = labels["site"].astype(str) == "B1"
    assert held.sum() > 0
    labels.loc[held, "survival_months"] = labels.loc[held, "survival_months"] * 3.0 + 1.0
    labels.loc[held, "censorship"] = 1 - labels.loc[held, "censorship"]
    labels.to_csv(labels_path, index=False)
    rna_path = next((altered / "c1").glob("rna.*"))
    rna = pd.read_csv(rna_path, index_col=0)
    cases = labels.loc[held, "case_id"].unique()
    rna.loc[cases] = rna.loc[cases] * 5.0 + 3.0
    rna.to_csv(rna_path)
    _run(altered, tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    ra = pd.read_csv(tmp_path / "a" / "rounds.csv")
    rb = pd.read_csv(tmp_path / "b" / "rounds.csv")
    held_a = ra[ra.site == "c1-B1"]["c_index"].to_numpy()
    held_b = rb[rb.site == "c1-B1"]["c_index"].to_numpy()
    assert not np.allclose(held_a, held_b)  # the alteration did reach the held-out evaluation


def test_resume_after_round_k_matches_uninterrupted_run(data_root: Path, tmp_path: Path):
    _run(data_root, tmp_path / "full", "rounds=3", "strategy=fedadam")
    _run(data_root, tmp_path / "killed", "rounds=3", "strategy=fedadam")
    for late in ("round-0002", "round-0003"):  # as if killed right after round 1
        shutil.rmtree(tmp_path / "killed" / "checkpoints" / late)
    (tmp_path / "killed" / "final_weights.npz").unlink()
    client_app.clear_caches()
    cfg = prepare(tiny_config(data_root, tmp_path / "ignored", f"resume={tmp_path / 'killed'}"))
    results = run_federation(DirectGrid(4), cfg)
    assert results["rounds_completed"] == 3
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    for key in full:
        np.testing.assert_array_equal(full[key], resumed[key])


def _error(msg: Message, reply: Message) -> Message:
    return Message(Error(code=1, reason="simulated crash of the site"), reply_to=msg)


def _nan(msg: Message, reply: Message) -> Message:
    arrays = arrays_to_numpy(reply.content["arrays"])
    first = next(iter(arrays))
    arrays[first] = np.full_like(arrays[first], np.nan)
    reply.content["arrays"] = numpy_to_arrays(arrays)
    return reply


def test_failing_client_and_nan_update_are_left_out(data_root: Path, tmp_path: Path, caplog):
    results, _ = _run(data_root, tmp_path / "faulty", "min_train_sites=1", faults={0: _error, 1: _nan})
    assert results["status"] == "completed"
    reasons = {(r["site"], r["round"]): r["reason"] for r in results["rejections"]}
    assert "simulated crash" in reasons[("c0-A1", 1)]
    assert "NaN/Inf" in reasons[("c0-A2", 2)]
    assert "update of site c0-A2" in caplog.text and "rejected" in caplog.text
    assert all(r["accepted"] == ["c1-B2"] for r in results["rounds"])


def test_too_few_sites_stops_with_resumable_checkpoint(data_root: Path, tmp_path: Path):
    with pytest.raises(TooFewSitesError, match="min_train_sites=3.*resume="):
        _run(data_root, tmp_path / "stopped", "min_train_sites=3", faults={0: _error})
    out = tmp_path / "stopped"
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "stopped" and saved["rounds_completed"] == 0
    assert (out / "checkpoints" / "round-0000" / "state.json").is_file()


def test_config_from_run_config(tmp_path: Path):
    cfg = config_from_run_config({"config-name": "simulate", "overrides": "rounds=3 strategy=fedprox"})
    assert cfg.rounds == 3 and cfg.strategy.name == "fedprox" and cfg.strategy.proximal_mu > 0
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 7\n")
    assert config_from_run_config({"config-file": str(path), "overrides": "rounds=3"}).rounds == 7
