"""Checkpoint save/load, pruning, RNG capture and resume-path resolution."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fedprog.federated.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)


def _ckpt(server_round: int) -> Checkpoint:
    rng = np.random.default_rng(server_round)
    return Checkpoint(
        server_round=server_round,
        arrays={"layer.weight": rng.normal(size=(2, 3)).astype(np.float32), "n": np.array(3, dtype=np.int64)},
        strategy_state={"m_t/layer.weight": rng.normal(size=(2, 3))},
        rng=capture_rng(),
        config={"rounds": 5, "strategy": {"name": "fedadam"}},
        federation={"prep": {"bins": {"edges": [0.0, 1.0]}}},
        history=[{"round": server_round}],
    )


def test_roundtrip(tmp_path):
    saved = _ckpt(2)
    save_checkpoint(tmp_path / "checkpoints", saved)
    loaded = load_checkpoint(tmp_path)  # a run's out folder resolves to its newest round
    assert loaded.server_round == 2 and list(loaded.arrays) == ["layer.weight", "n"]
    np.testing.assert_array_equal(loaded.arrays["layer.weight"], saved.arrays["layer.weight"])
    assert loaded.arrays["n"].dtype == np.int64
    np.testing.assert_array_equal(
        loaded.strategy_state["m_t/layer.weight"], saved.strategy_state["m_t/layer.weight"]
    )
    assert loaded.config == saved.config and loaded.federation == saved.federation


def test_keep_prunes_old_rounds_and_newest_wins(tmp_path):
    for r in range(4):
        save_checkpoint(tmp_path, _ckpt(r), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-0002", "round-0003"]
    assert find_checkpoint(tmp_path).name == "round-0003"
    (tmp_path / "round-0003" / "state.json").unlink()  # incomplete round: ignored
    assert find_checkpoint(tmp_path).name == "round-0002"


def test_rng_restore_repeats_draws():
    state = capture_rng()
    first = (random.random(), float(np.random.rand()))
    restore_rng(state)
    assert (random.random(), float(np.random.rand())) == first


def test_missing_checkpoint_names_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        find_checkpoint(tmp_path)
