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
    assert set(saved["km"]) == {"c1-B1"} and len(saved["km"]["c1-B1"]["km-low"]) == 13
    assert saved["environment"]["flwr"] == "1.42.0"
    from fedprog.data.synth import read_truth, truth_ceilings

    truth = read_truth(data_root)  # the held-out site's ceilings are computed over its own patients
    expected = truth_ceilings(truth, truth.index[(truth["cohort"] == "c1") & (truth["site"] == "B1")])
    assert saved["ceilings"]["c1-B1"]["oracle_c_index"] == pytest.approx(expected["oracle_c_index"])
    assert "transfer_c_index" in (out / "report.md").read_text()
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
    cfg = prepare(tiny_config(data_root, tmp_path / "killed", "rounds=3", f"resume={tmp_path / 'killed'}"))
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


# ------------------------------------------------------------------ tabular strong modality, no expression
def _tabular_dataset(root: Path) -> tuple[Path, set[str]]:
    """Two cohorts with a clinical table only (categorical is_female, NaN ages), a static test split."""
    import yaml
    from data_factory import write_cohort

    from fedprog.data.layout import MANIFEST

    write_cohort(root, "c0", n_cases=40, with_bags=False, seed=0)
    write_cohort(root, "c1", n_cases=30, with_bags=False, seed=1)
    test_cases: set[str] = set()
    for cohort in ("c0", "c1"):
        path = root / cohort / "labels.csv"
        labels = pd.read_csv(path)
        cases = list(dict.fromkeys(labels["case_id"]))
        test = {c for i, c in enumerate(cases) if i % 4 == 1}
        test_cases |= test
        labels["split"] = np.where(labels["case_id"].isin(test), "test", "train")
        labels.loc[labels["case_id"] == cases[2], "age"] = np.nan  # a missing value -> age__missing
        labels.to_csv(path, index=False)
    keys = yaml.safe_load((root / MANIFEST).read_text())
    keys["tables"]["clinical"].update(categorical=["is_female"], missing="keep")
    keys.update(expression=None, groups=None)
    keys["tables"].pop("rna")
    (root / MANIFEST).write_text(yaml.safe_dump(keys, sort_keys=False))
    return root, test_cases


def test_tabular_federation_fits_from_aggregates_and_evaluates_on_test_splits(tmp_path: Path):
    from fedprog.data import DatasetLayout, TabularTransform, build_sites, load_cohort
    from fedprog.federated.checkpoint import load_checkpoint

    root, test_cases = _tabular_dataset(tmp_path / "tab")
    client_app.clear_caches()
    cfg = prepare(load_config_for_tabular(root, tmp_path / "out", "model=linear_cox", "training.loss=cox"))
    results = run_federation(_tiny_sites_grid(int(cfg.expected_sites)), cfg)
    assert results["status"] == "completed"

    layout = DatasetLayout.load(cfg.data)
    sites = {s.name: s for s in build_sites(layout, cfg.federation, ["c1-C3"])}
    rounds = pd.read_csv(tmp_path / "out" / "rounds.csv")
    final = rounds[rounds["round"] == 2].set_index("site")
    assert set(final.index) == set(sites)
    for name, site in sites.items():  # every site (held-out too) evaluates on its local test split only
        assert site.test_ids and set(site.test_ids) <= test_cases
        assert final.loc[name, "n"] == len(site.test_ids)
    assert final.loc["c1-C3", "role"] == "holdout"

    cohorts = {c: load_cohort(layout, c) for c in ("c0", "c1")}
    train_rows = pd.concat(
        [
            cohorts[s.cohort].tables["clinical"].loc[list(s.case_ids)]
            for s in sites.values()
            if s.role == "train"
        ]
    )
    central = TabularTransform(categorical=["is_female"]).fit(train_rows)  # training split of training sites
    fitted = TabularTransform.from_state_dict(load_checkpoint(tmp_path / "out").federation["prep"]["strong"])
    assert (
        fitted.feature_names == central.feature_names == ["age", "age__missing", "is_female=0", "is_female=1"]
    )
    assert fitted.mean["age"] == pytest.approx(central.mean["age"], rel=1e-12)
    assert fitted.std["age"] == pytest.approx(central.std["age"], rel=1e-9)
    weights = _weights(tmp_path / "out")
    assert sum(v.size for v in weights.values()) == len(central.feature_names) + 1  # linear Cox: w, b


def test_newton_federation_reaches_the_pooled_stratified_ridge_cox_of_its_training_sites(tmp_path: Path):
    from test_newton import pooled_stratified_ridge

    from fedprog.data import DatasetLayout, TabularTransform, build_sites, load_cohort
    from fedprog.federated.checkpoint import load_checkpoint

    root, _ = _tabular_dataset(tmp_path / "tab")
    client_app.clear_caches()
    newton = ("model=linear_cox", "training.loss=cox", "strategy=newton", "training.weight_decay=0.05")
    newton = (*newton, "rounds=6")
    cfg = prepare(load_config_for_tabular(root, tmp_path / "out", *newton))
    results = run_federation(_tiny_sites_grid(int(cfg.expected_sites)), cfg)
    assert results["status"] == "completed"
    norms = [r["server_step"]["gradient_norm"] for r in results["rounds"]]
    assert norms[-1] < 1e-4 * norms[0]  # float32 weights: converged to their precision

    layout = DatasetLayout.load(cfg.data)
    prep = load_checkpoint(tmp_path / "out").federation["prep"]
    transform = TabularTransform.from_state_dict(prep["strong"])
    cohorts = {c: load_cohort(layout, c) for c in ("c0", "c1")}
    strata = []
    for site in build_sites(layout, cfg.federation, ["c1-C3"]):
        if site.role == "train":  # each training site its own stratum, its training cases only
            labels = cohorts[site.cohort].labels.loc[list(site.case_ids)]
            rows = cohorts[site.cohort].tables["clinical"].loc[list(site.case_ids)]
            event = 1.0 - labels["censorship"].to_numpy(float)
            features = transform.transform(rows).astype(float)
            strata.append((features, labels["survival_months"].to_numpy(), event))
    reference = pooled_stratified_ridge(strata, 0.05)
    weights = _weights(tmp_path / "out")
    fitted = np.append(weights["linear.weight"].ravel(), weights["linear.bias"])
    np.testing.assert_allclose(fitted, reference, atol=2e-4)


def test_a_site_with_no_more_cases_than_weights_refuses_newton_terms(tmp_path: Path, monkeypatch):
    import torch

    root, _ = _tabular_dataset(tmp_path / "tab")
    client_app.clear_caches()
    cfg = prepare(
        load_config_for_tabular(
            root, tmp_path / "out", "model=linear_cox", "training.loss=cox", "strategy=newton"
        )
    )
    run_federation(_tiny_sites_grid(int(cfg.expected_sites)), cfg)  # 6-9 cases per site, 5 weights: served
    client_app.clear_caches()
    wide = torch.nn.Linear(9, 1)  # 10 weights: more than any site's cases
    monkeypatch.setattr(client_app, "_model", lambda *args: wide)
    cfg.out = str(tmp_path / "wide")
    with pytest.raises(TooFewSitesError, match="a Newton reply needs more cases than weights"):
        run_federation(_tiny_sites_grid(int(cfg.expected_sites)), cfg)


def test_strong_only_model_on_tabular_data(tmp_path: Path):
    root, _ = _tabular_dataset(tmp_path / "tab")
    client_app.clear_caches()
    cfg = prepare(
        load_config_for_tabular(
            root, tmp_path / "out", "model=abmil", "model.dim=8", "model.pool_hidden=8", "model.head_hidden=8"
        )
    )
    results = run_federation(_tiny_sites_grid(int(cfg.expected_sites)), cfg)
    assert results["status"] == "completed" and np.isfinite(results["headline"]["train_c_index"])


def _tiny_sites_grid(n_nodes: int) -> DirectGrid:
    """A grid whose sites (6-9 cases each) lower their own disclosure limits in their node config."""
    grid = DirectGrid(n_nodes)
    for context in grid.contexts.values():
        context.node_config.update({"min-cases": 1, "min-events": 1})
    return grid


def load_config_for_tabular(root: Path, out: Path, *overrides: str):
    from fedprog.config import load_config

    return load_config(
        "simulate",
        [
            "data=folder",
            f"data.root={root}",
            f"out={out}",
            "+federation.split_column=split",
            "heldout=[c1-C3]",
            "rounds=2",
            "training.batch_size=4",
            "training.grad_accum=1",
            "training.local_steps=3",
            "training.balanced_sampling=false",
            "node_wait_timeout=5",
            *overrides,
        ],
    )


# ------------------------------------------------------------------ privacy
def test_central_dp_reports_epsilon_every_round_and_resumes_the_accountant(data_root: Path, tmp_path: Path):
    dp = ("privacy=central_dp", "privacy.central_dp.noise_multiplier=0.5", "rounds=2")
    results, _ = _run(data_root, tmp_path / "full", *dp)
    epsilons = [r["privacy"]["epsilon"] for r in results["rounds"]]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1]
    assert results["privacy"] == {"mode": "central_dp", "epsilon": epsilons[1], "delta": 1e-5}
    rounds = pd.read_csv(tmp_path / "full" / "rounds.csv")
    assert rounds.groupby("round")["epsilon"].first().tolist() == pytest.approx(epsilons)
    report = (tmp_path / "full" / "report.md").read_text()
    assert "Privacy spent (central_dp" in report and f"epsilon = {epsilons[1]:.3f}" in report

    full = _weights(tmp_path / "full")  # now kill it after round 1 and resume in the same folder
    shutil.rmtree(tmp_path / "full" / "checkpoints" / "round-0002")
    client_app.clear_caches()
    cfg = prepare(tiny_config(data_root, tmp_path / "full", f"resume={tmp_path / 'full'}"))
    resumed = run_federation(DirectGrid(4), cfg)
    assert resumed["privacy"]["epsilon"] == pytest.approx(epsilons[1], rel=1e-12)
    again = _weights(tmp_path / "full")
    for key in full:  # the DP noise stream (entropy-seeded, not the config seed) is checkpointed too
        np.testing.assert_array_equal(full[key], again[key])
