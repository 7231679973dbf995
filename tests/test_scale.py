"""Scale: attaching a simulation to a running Ray cluster (``simulation.ray_address``)."""

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

import pytest
from fed_helpers import tiny_config

from fedprog.federated import simulation

RAY = Path(sys.executable).with_name("ray")
HEAD_START_S = 60.0  # ceiling on `ray start --head` on a loaded 2-core machine
HEAD_STOP_S = 30.0


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "synth"
    simulation.prepare(tiny_config(root, root.parent / "unused"))
    return root


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


def test_bad_ray_address_fails_before_start_up(data_root: Path, tmp_path: Path, capsys):
    cfg = tiny_config(data_root, tmp_path / "run", "simulation.ray_address=nohost")
    assert simulation.main(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert "simulation.ray_address='nohost'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_simulation_attaches_to_a_ray_head(data_root: Path, tmp_path: Path):
    out = tmp_path / "run"
    with ray_head() as address:
        cfg = tiny_config(data_root, out, "rounds=1", f"simulation.ray_address={address}")
        assert simulation.main(cfg) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["rounds_completed"] == 1
