"""Scale: many generated sites with client sampling, and attaching a simulation to a running Ray cluster."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from fed_helpers import DirectGrid, tiny_config

from fedprog.config import load_config
from fedprog.data.synth import SynthError, SynthParams
from fedprog.federated import client_app, simulation
from fedprog.federated.server_app import run_federation

RAY = Path(sys.executable).with_name("ray")
HEAD_START_S = 60.0  # ceiling on `ray start --head` on a loaded 2-core machine
HEAD_STOP_S = 30.0
MANY = {"cancers": 4, "sites_per_cancer": 8, "patients_per_site": 15}  # 32 sites; c3's 8 are held out
FRACTION_TRAIN = 0.25
SAMPLED = (f"strategy.fraction_train={FRACTION_TRAIN}", "eval_every=2", "audit.enabled=true")


def _many_sites(root: Path, out: Path, *overrides: str):
    """The tiny simulate config on 4 cancers x 8 generated hospitals, held-out cancer c3."""
    k, per, size = MANY["cancers"], MANY["sites_per_cancer"], MANY["patients_per_site"]

    def values(value: object) -> str:
        return "[" + ",".join([str(value)] * k) + "]"

    return tiny_config(
        root,
        out,
        f"data.synth.cancers=[{','.join(f'c{i}' for i in range(k))}]",
        f"data.synth.n_patients={values(per * size)}",
        f"data.synth.site_fractions={'[' + ','.join(['1.0'] * per) + ']'}",
        f"data.synth.survival.weibull_scale={values(50.0)}",
        f"data.synth.survival.weibull_shape={values(1.1)}",
        f"data.synth.survival.censoring={values(0.4)}",
        f"heldout=[c{k - 1}]",
        *overrides,
    )


@pytest.fixture(scope="module")
def many_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 32-site dataset, generated once for the module."""
    root = tmp_path_factory.mktemp("scale") / "synth"
    simulation.prepare(_many_sites(root, root.parent / "unused"))
    return root


def _sampled_sites(out: Path) -> tuple[set[str], set[str], list[set[str]]]:
    """(training sites, held-out sites, the sites sent a training message in each round) of a finished run,
    after checking that every round sampled ``fraction_train`` of the training sites and only them."""
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["rounds_completed"] == 2
    roles = {s["site"]: s["role"] for s in results["sites"]}
    train = {site for site, role in roles.items() if role == "train"}
    heldout = set(roles) - train
    assert len(train) == 24 and len(heldout) == 8
    expected = int(len(train) * FRACTION_TRAIN)
    for summary in results["rounds"]:
        assert len(summary["accepted"]) == expected and set(summary["accepted"]) <= train
        timing = summary["timing"]  # where the round's time went; evaluation only on the eval_every schedule
        assert {"configure", "train_wait", "aggregate", "client_train"} <= set(timing)
        assert ("evaluate" in timing) == (summary["round"] == 2)
        assert 0 < timing["client_train"] and timing["train_wait"] + timing["aggregate"] <= summary["seconds"]
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    sent = [set(e["sites"]) for e in audit if e["event"] == "train_sent"]
    assert len(sent) == 2 and all(len(s) == expected and s <= train for s in sent)
    rows = pd.read_csv(out / "rounds.csv")
    assert set(rows["round"]) == {2}  # eval_every=2: round 1 evaluates nobody
    assert set(rows.loc[rows["role"] == "holdout", "site"]) == heldout
    return train, heldout, sent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[str]:
    """A one-node Ray cluster on loopback started by Ray's own ``ray start --head``; yields its address.

    ``--block`` keeps the launcher in the foreground, so SIGTERM to its PID stops every Ray process it started
    (never ``ray stop``, which would stop other Ray clusters of the same user too). The short temporary folder
    keeps Ray's socket paths under the OS limit.
    """
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    log_path = temp / "head.log"
    command = [
        str(RAY), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
        "--num-cpus", str(num_cpus), "--include-dashboard=false", "--disable-usage-stats",
        "--temp-dir", str(temp), "--ray-client-server-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()),
    ]  # fmt: skip
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + HEAD_START_S
        while "Ray runtime started" not in log_path.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"`ray start --head` did not start (exit {head.poll()}): {log_path.read_text()[-800:]}"
                )
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=HEAD_STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # its own session: only the processes this test started
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("auto", "auto"),
        ("127.0.0.1:6379", "127.0.0.1:6379"),
        (" head.example.org:10", "head.example.org:10"),
    ],
)
def test_ray_address_accepts_null_auto_and_host_port(value, expected):
    assert simulation.check_ray_address(value) == expected


@pytest.mark.parametrize("value", ["localhost", ":6379", "host:", "host:port", "host:70000", "ray://h"])
def test_ray_address_rejects_malformed_values(value):
    with pytest.raises(simulation.RayAddressError, match="simulation.ray_address"):
        simulation.check_ray_address(value)


def test_ray_init_args_attach_or_start_local():
    assert simulation.ray_init_args({"ray_address": None, "ray_num_cpus": 2})["num_cpus"] == 2
    attached = simulation.ray_init_args({"ray_address": "auto", "ray_num_cpus": None})
    assert attached["address"] == "auto" and "num_cpus" not in attached
    with pytest.raises(simulation.RayAddressError, match="simulation.ray_num_cpus"):
        simulation.ray_init_args({"ray_address": "auto", "ray_num_cpus": 2})


def test_bad_ray_address_fails_before_start_up(tmp_path: Path, capsys):
    cfg = tiny_config(tmp_path / "synth", tmp_path / "run", "simulation.ray_address=nohost")
    assert simulation.main(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert "simulation.ray_address='nohost'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "synth").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_simulation_attaches_to_a_ray_head(many_root: Path, tmp_path: Path):
    """The 32-site sampled federation runs on a Ray cluster started by ``ray start --head`` (not its own)."""
    out = tmp_path / "run"
    with ray_head() as address:
        cfg = _many_sites(many_root, out, *SAMPLED, f"simulation.ray_address={address}")
        assert simulation.main(cfg) == 0
    _sampled_sites(out)


def test_synth_many_preset_has_at_least_128_sites():
    params = SynthParams.from_config(load_config("simulate", ["data=synth_many"]).data.synth)
    codes = [code for codes in params.sites.values() for code in codes]
    assert len(codes) >= 128 and len(set(codes)) == len(codes)
    assert params.sites["c0"][:10] == ["A1", "A2", "A3", "A4", "A5", "A6", "A7", "A8", "A9", "AA"]


def test_synth_refuses_more_sites_than_site_codes():
    cfg = load_config("simulate", ["data.synth.site_fractions=[" + ",".join(["1.0"] * 36) + "]"])
    with pytest.raises(SynthError, match="data.synth.site_fractions: expected 1-35"):
        SynthParams.from_config(cfg.data.synth)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_many_sites_sample_training_sites_only(many_root: Path, tmp_path: Path):
    """32 hospitals, fraction_train 0.25: each round trains 6 of the 24 training sites, never a held-out one;
    every site (held-out ones included) evaluates on the eval_every schedule only."""
    out = tmp_path / "run"
    client_app.clear_caches()
    cfg = simulation.prepare(_many_sites(many_root, out, *SAMPLED))
    assert int(cfg.expected_sites) == MANY["cancers"] * MANY["sites_per_cancer"]
    grid = DirectGrid(int(cfg.expected_sites))
    run_federation(grid, cfg)
    train, heldout, sent = _sampled_sites(out)
    assert sent[0] != sent[1]  # a new sample each round
    sites = json.loads((out / "results.json").read_text())["sites"]
    node_ids = {s["site"]: s["node_id"] for s in sites}
    trained = {grid.node_ids[partition] for kind, partition in grid.sent if kind == "train"}
    assert trained == {node_ids[site] for site in set.union(*sent)}
    assert trained.isdisjoint(node_ids[site] for site in heldout)
