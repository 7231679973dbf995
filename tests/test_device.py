"""The GPU path on a CPU machine: resolved devices, simulated clients' device and GPU share, AMP, patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fed_helpers import tiny_config
from flwr.app import Context, RecordDict
from torch import nn

from fedprog import device as device_module
from fedprog.device import (
    DEFAULT_GPU_SHARE,
    DeviceError,
    autocast,
    client_device,
    client_resources,
    resolve_device,
    simulation_device,
)
from fedprog.engine import TrainConfig


@pytest.fixture()
def fake_cuda(monkeypatch):
    """Pretend this machine has CUDA (nothing is moved to the GPU in these tests)."""
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module.torch.cuda, "get_device_name", lambda *_: "fake GPU")


def test_auto_follows_cuda_availability_and_the_gpu_share(monkeypatch):
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("auto", num_gpus=0.5) == torch.device("cuda")
    assert resolve_device("auto", num_gpus=0) == torch.device("cpu")  # a client given no GPU share
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_cuda_without_a_gpu_and_bad_names_fail_in_one_line(monkeypatch):
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^training.device=cuda: CUDA is missing"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="training.device='gpu': choose auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    with pytest.raises(DeviceError, match=r"simulation.num_gpus=0"):
        resolve_device("cuda", num_gpus=0)


def test_simulation_gives_clients_cuda_and_a_gpu_share(fake_cuda):
    assert simulation_device("auto", 0.0) == ("cuda", DEFAULT_GPU_SHARE)
    assert simulation_device("auto", 0.5) == ("cuda", 0.5)
    assert simulation_device("cuda", 1.0) == ("cuda", 1.0)
    assert simulation_device("cpu", 0.5) == ("cpu", 0.0)


def test_simulation_on_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    assert simulation_device("auto", 0.0) == ("cpu", 0.0)
    with pytest.raises(DeviceError, match="simulation.num_gpus=0.5: CUDA is not available"):
        simulation_device("auto", 0.5)
    with pytest.raises(DeviceError, match="training.device=cuda"):
        simulation_device("cuda", 0.0)


def test_a_site_node_config_device_wins_over_training_device(fake_cuda):
    assert client_device("cuda", {}) == "cuda"
    assert client_device("cuda", {"device": "cpu"}) == "cpu"
    assert client_device("cpu", {"device": "auto"}) == "cuda"


# ------------------------------------------------------------------------------------------ simulate plumbing
@pytest.fixture(scope="module")
def sim_cfg(tmp_path_factory):
    from fedprog.federated.simulation import prepare

    root = tmp_path_factory.mktemp("device") / "synth"
    return prepare(tiny_config(root, root.parent / "out", "training.device=cpu", "training.max_patches=4"))


def _context(partition: int, n: int, **node_config) -> Context:
    config = {"partition-id": partition, "num-partitions": n, **node_config}
    return Context(run_id=1, node_id=100 + partition, node_config=config, state=RecordDict(), run_config={})


def test_simulate_sends_the_resolved_device_and_reserves_a_gpu_share(sim_cfg, fake_cuda):
    from fedprog.config import load_config
    from fedprog.federated.simulation import prepare

    cfg = prepare(load_config("simulate", [f"data.root={sim_cfg.data.root}", f"out={sim_cfg.out}"]))
    assert cfg.training.device == "cuda" and cfg.simulation.num_gpus == DEFAULT_GPU_SHARE
    assert client_resources(cfg.simulation.num_cpus, cfg.simulation.num_gpus) == {
        "num_cpus": 1.0,
        "num_gpus": DEFAULT_GPU_SHARE,
    }
    assert sim_cfg.training.device == "cpu" and sim_cfg.simulation.num_gpus == 0.0


def test_each_client_resolves_the_configured_device(sim_cfg):
    from fedprog.federated import client_app

    client_app.clear_caches()
    n = int(sim_cfg.expected_sites)
    devices = {client_app.resolve_site(sim_cfg, _context(i, n)).device for i in range(n)}
    assert devices == {"cpu"}
    cuda_cfg = sim_cfg.copy()
    cuda_cfg.training.device = "cuda"
    client_app.clear_caches()
    with pytest.raises(DeviceError, match="training.device=cuda"):  # no CUDA here: one line, at once
        client_app.resolve_site(cuda_cfg, _context(0, n))


def test_clients_sample_max_patches_per_bag_in_training_only(sim_cfg):
    from fedprog.data import load_cohorts
    from fedprog.federated import client_app
    from fedprog.pipeline import fit_preprocessing

    client_app.clear_caches()
    n = int(sim_cfg.expected_sites)
    handles = [client_app.resolve_site(sim_cfg, _context(i, n)) for i in range(n)]
    handle = next(h for h in handles if h.site.role == "train")
    cohorts = load_cohorts(handle.layout)
    prep = fit_preprocessing(handle.layout, cohorts, {handle.site.cohort: handle.site.case_ids}, n_bins=4)
    train_ds, eval_ds = client_app.site_datasets(sim_cfg, handle, json.dumps(prep.state_dict()))
    train_ds.train()
    train_sizes = [train_ds[i].strong.shape[0] for i in range(len(train_ds))]
    eval_sizes = [eval_ds.eval()[i].strong.shape[0] for i in range(len(eval_ds))]
    assert max(train_sizes) == 4  # synth bags have 8-16 patches
    assert min(eval_sizes) > 4  # evaluation reads whole bags


# ------------------------------------------------------------------------------------------ AMP
def test_bf16_autocast_runs_on_cpu_and_matches_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    losses = {}
    for amp in (False, True):
        with autocast(torch.device("cpu"), enabled=amp, dtype="bfloat16"):
            out = model(x)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        losses[amp] = float(nn.functional.mse_loss(out.float(), y))
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
    with pytest.raises(DeviceError, match="amp_dtype"):
        autocast(torch.device("cpu"), enabled=True, dtype="float8")


def test_engine_trains_under_bf16_autocast_like_fp32_on_training_device(tmp_path, monkeypatch):
    from data_factory import write_cohort

    from fedprog.config import load_config
    from fedprog.data import load_cohorts
    from fedprog.engine import train
    from fedprog.pipeline import build_model, fit_preprocessing, make_dataset

    layout = write_cohort(tmp_path, "c0", n_cases=16, seed=0)
    cohorts = load_cohorts(layout)
    prep = fit_preprocessing(layout, cohorts, {"c0": cohorts["c0"].case_ids}, n_bins=4)
    data = make_dataset(cohorts["c0"], cohorts["c0"].case_ids, prep, max_patches=8)
    model_cfg = load_config("train", ["model=abmil", "model.dim=16", "model.dropout=0"]).model
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = build_model(model_cfg, data, loss="nll")
        cfg = TrainConfig.from_cfg({"epochs": 2, "grad_accum": 4, "select_on": "last", "amp": amp})
        losses[amp] = np.array(train(model, data, cfg, device="cpu", progress=False).epoch_loss)
    assert np.all(np.isfinite(losses[True]))
    assert not np.array_equal(losses[True], losses[False])  # autocast did change the arithmetic
    np.testing.assert_allclose(losses[True], losses[False], rtol=5e-2)
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    on_cuda = TrainConfig.from_cfg({"epochs": 1, "select_on": "last", "device": "cuda"})
    with pytest.raises(DeviceError, match="training.device=cuda"):  # train() defaults to training.device
        train(model, data, on_cuda, progress=False)


def test_site_start_checks_the_hospital_device_before_starting(tmp_path, monkeypatch):
    from fedprog.config import load_config
    from fedprog.deploy.site import SiteConfigError, load_settings

    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: False)
    path = tmp_path / "h1.yaml"
    base = "site: h1\ndata_root: data\ncohort: c0\nrole: train\n"
    path.write_text(base + "device: auto\n")
    assert load_settings(load_config("site", [f"config={path}"])).device == "auto"
    path.write_text(base + "device: cuda\n")
    with pytest.raises(SiteConfigError, match=r"h1.yaml: device=cuda: CUDA is missing"):
        load_settings(load_config("site", [f"config={path}"]))
