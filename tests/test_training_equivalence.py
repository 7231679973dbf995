"""A federated round computes the same update as the centralized training code on the same data.

One FedAvg round of the in-process federation (the ClientApp handlers, the held-out-aware strategy) must equal
``engine.train`` run directly on each training site's cases from the same initial weights, preprocessing and
seed, averaged by number of examples: the federation adds transport, not a different training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fed_helpers import DirectGrid, tiny_config
from omegaconf import OmegaConf

from fedprog import engine
from fedprog.data import DatasetLayout, build_sites, load_cohorts
from fedprog.federated import client_app
from fedprog.federated.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint
from fedprog.federated.federation import derived_seed
from fedprog.federated.server_app import run_federation
from fedprog.federated.simulation import prepare
from fedprog.pipeline import Preprocessing, build_model, make_dataset


def _central_update(cfg, site, cohort, prep: Preprocessing, initial: dict[str, np.ndarray]):
    """The site's round-1 update computed without Flower: pipeline dataset, model, ``engine.train``."""
    seed = derived_seed(int(cfg.seed), 1, site.name)
    data = make_dataset(
        cohort,
        site.case_ids,
        prep,
        max_patches=cfg.training.max_patches,
        seed=int(cfg.seed),
        site_cases=site.all_ids,
    )
    data.seed = seed
    data.set_epoch(0)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), data, loss=str(cfg.training.loss))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in initial.items()}, strict=True)
    training = OmegaConf.to_container(cfg.training, resolve=True)
    known = set(engine.TrainConfig.__dataclass_fields__)
    train_cfg = engine.TrainConfig.from_cfg({k: v for k, v in training.items() if k in known}, seed=seed)
    engine.train(model, data, train_cfg, progress=False, run_position=engine.RunPosition(0, int(cfg.rounds)))
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}, len(data)


def test_a_fedavg_round_equals_centralized_training_on_each_site_averaged(tmp_path: Path) -> None:
    cfg = prepare(tiny_config(tmp_path / "synth", tmp_path / "out", "rounds=1", "training.epochs=2"))
    client_app.clear_caches()
    run_federation(DirectGrid(int(cfg.expected_sites)), cfg)
    start = load_checkpoint(list_checkpoints(tmp_path / "out" / CHECKPOINT_DIR)[0])
    assert start.server_round == 0
    prep = Preprocessing.from_state_dict(start.federation["prep"])

    layout = DatasetLayout.load(cfg.data)
    sites = build_sites(layout, cfg.federation, list(cfg.heldout))
    cohorts = load_cohorts(layout, sorted({s.cohort for s in sites}))
    updates = [
        _central_update(cfg, s, cohorts[s.cohort], prep, start.arrays) for s in sites if s.role == "train"
    ]
    assert len(updates) == 3  # c0-A1, c0-A2, c1-B2 train; c1-B1 is held out
    total = sum(n for _, n in updates)
    expected = {k: sum(w[k].astype(np.float64) * n for w, n in updates) / total for k in start.arrays}

    federated = dict(np.load(tmp_path / "out" / "final_weights.npz"))
    assert set(federated) == set(expected)
    moved = max(float(np.abs(expected[k] - start.arrays[k]).max()) for k in expected)
    assert moved > 1e-3  # the round trained: the comparison is not between two copies of the start
    for key, value in expected.items():
        np.testing.assert_allclose(federated[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
