"""A site's optimizer state between rounds: kept on the site's own disk so that a resumed run is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedprog.federated.site_state import (
    SIMULATION_SUBDIR,
    SiteStateStore,
    pack_state,
    site_state_store,
    unpack_state,
)


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"state.0.exp_avg": torch.full((3,), value), "state.0.step": torch.tensor(float(value))}


def test_load_before_returns_the_newest_earlier_round(tmp_path: Path) -> None:
    store = SiteStateStore(tmp_path, "run1")
    for r in (1, 2, 4):
        store.save(r, _state(float(r)))
    assert store.load_before(1) is None
    assert float(store.load_before(3)["state.0.step"]) == 2.0  # a resumed round 3 continues from round 2
    assert float(store.load_before(9)["state.0.step"]) == 4.0
    torch.testing.assert_close(store.load_before(2)["state.0.exp_avg"], torch.full((3,), 1.0))


def test_packed_state_round_trips_every_tensor_dtype_and_shape(tmp_path: Path) -> None:
    state = {
        "adam/0/exp_avg": torch.randn(4, 3),
        "adam/0/exp_avg_sq": torch.rand(4, 3),
        "adam/0/step": torch.tensor(7.0),
        "adam/1/exp_avg": torch.randn(5),
        "count": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0, 2),
    }
    packed = pack_state(state)
    assert sorted(packed) == ["__layout__", "packed_<f4", "packed_<i8"]  # one buffer per dtype
    store = SiteStateStore(tmp_path, "run1")
    store.save(1, state)
    loaded = store.load_before(2)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        torch.testing.assert_close(loaded[name], tensor)
    loaded["adam/0/exp_avg"].add_(1.0)  # writable, and a view of no other entry
    torch.testing.assert_close(loaded["adam/0/exp_avg_sq"], state["adam/0/exp_avg_sq"])


def test_a_state_file_of_the_earlier_format_is_still_read(tmp_path: Path) -> None:
    store = SiteStateStore(tmp_path, "run1")
    store.folder.mkdir(parents=True)
    np.savez(store.folder / "round-0001.npz", **{k: v.numpy() for k, v in _state(3.0).items()})
    loaded = store.load_before(2)
    torch.testing.assert_close(loaded["state.0.exp_avg"], torch.full((3,), 3.0))
    assert unpack_state({"x": np.ones(2, dtype=np.float32)})["x"].tolist() == [1.0, 1.0]


def test_keep_prunes_old_rounds_and_runs_stay_apart(tmp_path: Path) -> None:
    store = SiteStateStore(tmp_path, "run1", keep=2)
    for r in range(1, 6):
        store.save(r, _state(float(r)))
    assert store.rounds() == [4, 5]
    assert SiteStateStore(tmp_path, "run2").load_before(9) is None  # another run never reads these


def test_run_id_cannot_escape_the_state_folder(tmp_path: Path) -> None:
    from fedprog.report import UnsafePathError

    with pytest.raises(UnsafePathError):
        SiteStateStore(tmp_path, "../elsewhere")


def test_where_a_site_keeps_its_state(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"run_id": "abc", "out": str(tmp_path / "out"), "checkpoint": {"keep": 3}})
    simulated = site_state_store(cfg, {}, "c0-A1")
    assert (
        simulated is not None and simulated.folder == tmp_path / "out" / SIMULATION_SUBDIR / "c0-A1" / "abc"
    )
    deployed = site_state_store(cfg, {"data-root": "/h", "state-dir": str(tmp_path / "site")}, "h0")
    assert deployed is not None and deployed.folder == tmp_path / "site" / "abc" and deployed.keep == 3
    assert site_state_store(cfg, {"data-root": "/h"}, "h0") is None  # never the server's out folder


def test_a_site_without_a_state_folder_keeps_its_moments_in_the_node_context() -> None:
    from flwr.app import Context, RecordDict

    from fedprog.federated import client_app

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    state = {"adam/0/step": torch.tensor(2.0), "adam/0/exp_avg": torch.ones(3)}
    client_app._keep_optimizer_state(context, None, 2, state)
    assert client_app._kept_optimizer_state(context, None, 2) is None  # a round never reads its own moments
    kept = client_app._kept_optimizer_state(context, None, 3)
    assert kept is not None
    torch.testing.assert_close(kept["adam/0/exp_avg"], torch.ones(3))


def test_a_site_with_a_state_folder_keeps_its_moments_there_not_in_the_context(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from fedprog.federated import client_app

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    store = SiteStateStore(tmp_path, "run1")
    client_app._keep_optimizer_state(context, store, 2, {"adam/0/step": torch.tensor(2.0)})
    assert not context.state.array_records  # the context travels with every simulated message
    assert store.rounds() == [2]
    assert float(client_app._kept_optimizer_state(context, store, 3)["adam/0/step"]) == 2.0
