from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from fedprog.config import load_config
from fedprog.deploy import processes, server, site
from fedprog.deploy.audit import verify
from fedprog.deploy.certs import make_certificates

REPO = Path(__file__).resolve().parents[1]
TINY_SYNTH = [
    "data.synth.n_patients=[40,40,40,40]",
    "data.synth.patches=[4,8]",
    "data.synth.feature_dim=8",
    "data.synth.n_genes=30",
    "data.synth.n_pathways=4",
]


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedprog.data.synth import SynthParams, generate

    out = tmp_path_factory.mktemp("synth") / "data"
    cfg = load_config("synth", [f"out={out}", *TINY_SYNTH])
    generate(SynthParams.from_config(cfg.data.synth), out)
    return out


@pytest.fixture
def started() -> Iterator[list[processes.ManagedProcess]]:
    """Every process a test starts goes in this list and is stopped by PID, also when the test fails."""
    running: list[processes.ManagedProcess] = []
    try:
        yield running
    finally:
        for process in reversed(running):
            processes.stop_process(process, timeout=3)


def _site_file(path: Path, **keys: object) -> Path:
    OmegaConf.save(OmegaConf.create(keys), path)
    return path


def _site_settings(path: Path) -> object:
    return site.load_settings(load_config("site", [f"config={path}"]))


# --------------------------------------------------------------------------------------------- processes


def test_process_group_stopped_by_pid(tmp_path: Path, started: list[processes.ManagedProcess]) -> None:
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    proc = processes.start_process(
        "sleeper",
        [sys.executable, "-c", script],
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / "p.log",
        pid_file=tmp_path / "p.pid",
    )
    started.append(proc)
    assert processes.read_pid_file(tmp_path / "p.pid") == proc.pid
    with pytest.raises(processes.ProcessError, match="already running with PID"):
        processes.start_process(
            "sleeper", ["sleep", "1"], env={}, log_path=tmp_path / "q.log", pid_file=tmp_path / "p.pid"
        )
    time.sleep(0.3)
    assert processes._group_alive(proc.pid)
    processes.stop_process(proc, timeout=5)
    assert not processes._group_alive(proc.pid)  # the grandchild `sleep` is gone too
    assert not (tmp_path / "p.pid").exists()


def test_stale_pid_file_is_ignored(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    pid_file.write_text(f"{processes.os.getpid()} flower-superlink\n")  # alive, but not that command
    assert processes.read_pid_file(pid_file) is None
    assert not pid_file.exists()


def test_health_wait_fails_fast_with_log(tmp_path: Path) -> None:
    proc = processes.start_process(
        "crasher",
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
        env={},
        log_path=tmp_path / "c.log",
    )
    with pytest.raises(processes.ProcessError, match=r"crasher exited with code 3(.|\n)*boom"):
        processes.wait_for_health(proc, f"http://127.0.0.1:{processes.free_port()}/health", timeout=10)


def test_flwr_env(tmp_path: Path) -> None:
    env = processes.flwr_env(tmp_path / "home")
    assert env["FLWR_HOME"] == str((tmp_path / "home").resolve())
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


# --------------------------------------------------------------------------------------------- configs


def test_server_config_and_superlink_command(tmp_path: Path) -> None:
    settings = server.load_settings(load_config("server", [f"config={REPO / 'server/server.yaml'}"]))
    argv = server.superlink_argv(settings)
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--database",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ):
        assert flag in argv
    assert argv[argv.index("--port") + 1] == "9093"
    assert set(settings.sites) == {"blca", "brca", "hnsc", "stad"}
    settings.flwr_home = str(tmp_path / "home")
    text = server.write_connection(settings).read_text()
    assert (
        'default = "fedprog"' in text and 'address = "localhost:9093"' in text and "root-certificates" in text
    )


def test_server_run_config_composes_fedprog_config(tmp_path: Path) -> None:
    settings = server.load_settings(load_config("server", [f"config={REPO / 'server/server.yaml'}"]))
    settings.state_dir = str(tmp_path / "state")
    settings.out = str(tmp_path / "out")
    settings.run.overrides = ["rounds=3"]
    values = server.run_config(settings)
    composed = OmegaConf.load(values["config-file"])
    assert (
        composed.rounds == 3 and composed.out == str((tmp_path / "out").resolve()) and composed.resume is None
    )
    checkpoint = tmp_path / "out" / "checkpoints" / "round-0002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    settings.resume = "auto"
    composed = OmegaConf.load(server.run_config(settings)["config-file"])
    assert composed.resume == str((tmp_path / "out").resolve())
    settings.run_config = {"bad": [1, 2]}
    with pytest.raises(server.ServerConfigError, match=r"run_config\['bad'\]"):
        server.run_config(settings)


def test_server_missing_keys_and_files(tmp_path: Path) -> None:
    with pytest.raises(server.ServerConfigError, match="does not exist"):
        server.load_settings(load_config("server", [f"config={tmp_path / 'none.yaml'}"]))
    settings = server.load_settings(load_config("server", [f"certs.ca={tmp_path / 'ca.crt'}"]))
    with pytest.raises(server.ServerConfigError, match=r"certs\.ca=.*ca\.crt"):
        server.start_superlink(settings)
    assert server.start_main(load_config("server", [f"config={tmp_path / 'none.yaml'}"])) == 1


@pytest.mark.parametrize("name", ["blca", "brca", "hnsc", "stad"])
def test_tcga_example_site_configs(name: str) -> None:
    settings = _site_settings(REPO / "sites" / "examples" / f"{name}.yaml")
    assert settings.site == name and settings.cohort == name
    assert settings.data.strong == "clinical" and settings.data.cohorts == [name]
    assert settings.role == ("holdout" if name == "stad" else "train")
    argv = site.supernode_argv(settings)
    assert "--root-certificates" in argv and "--auth-supernode-private-key" in argv
    assert argv[argv.index("--isolation") + 1] == "process"
    config = argv[argv.index("--node-config") + 1]
    assert f"site='{name}'" in config and f"cohort='{name}'" in config and "data-root='/" in config


def test_synth_example_site_configs() -> None:
    files = sorted((REPO / "sites" / "examples").glob("synth_*.yaml"))
    assert len(files) >= 3
    roles = [_site_settings(path).role for path in files]
    assert roles.count("train") >= 2 and roles.count("holdout") >= 1
    ports = [_site_settings(path).port for path in files]
    assert len(set(ports)) == len(ports)


def test_site_config_errors(tmp_path: Path) -> None:
    bad_role = _site_file(tmp_path / "r.yaml", site="x", data_root="/tmp", cohort="c0", role="observer")
    with pytest.raises(site.SiteConfigError, match=r"role='observer'"):
        _site_settings(bad_role)
    missing = _site_file(tmp_path / "m.yaml", site="x", cohort="c0")
    with pytest.raises(site.SiteConfigError, match="'data_root' is not set"):
        _site_settings(missing)
    quote = _site_file(tmp_path / "q.yaml", site="x'y", data_root="/tmp", cohort="c0")
    with pytest.raises(site.SiteConfigError, match="single quote"):
        _site_settings(quote)


# --------------------------------------------------------------------------------------------- site refusal


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (
            lambda labels: labels.assign(
                survival_months=labels.survival_months.where(labels.index != 3, -1.0)
            ),
            "survival_months",
        ),
        (lambda labels: labels.drop(columns=["censorship"]), "censorship"),
    ],
    ids=["negative-time", "missing-column"],
)
def test_site_start_refuses_bad_data(
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    corrupt,
    expected: str,  # noqa: ANN001
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    labels_path = data / "c0" / "labels.csv"
    corrupt(pd.read_csv(labels_path)).to_csv(labels_path, index=False)
    path = _site_file(
        tmp_path / "site.yaml",
        site="h0",
        data_root=str(data),
        cohort="c0",
        ca=None,
        state_dir=str(tmp_path / "state"),
        port=processes.free_port(),
    )

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started although the data check failed")

    monkeypatch.setattr(site, "start_process", forbidden)
    settings = _site_settings(path)
    with pytest.raises(site.SiteDataError, match=rf"site h0: data check failed(.|\n)*{expected}"):
        site.start_site(settings)
    assert not (tmp_path / "state" / site.SUPERNODE_PID).exists()
    entries = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert entries[-1]["event"] == "site_refused_bad_data" and verify(tmp_path / "state" / "audit.jsonl").ok
    assert site.start_main(load_config("site", [f"config={path}"])) == 1


def test_site_data_check_passes_on_good_data(tiny_data: Path, tmp_path: Path) -> None:
    path = _site_file(
        tmp_path / "site.yaml", site="h0", data_root=str(tiny_data), cohort="c1", role="holdout"
    )
    summary = site.check_site_data(_site_settings(path))
    assert summary is not None


def test_site_missing_data_folder(tmp_path: Path) -> None:
    path = _site_file(
        tmp_path / "s.yaml", site="h9", data_root=str(tmp_path / "nowhere"), cohort="c0", ca=None
    )
    with pytest.raises(site.SiteDataError, match=r"site h9: data folder .*nowhere does not exist"):
        site.start_site(_site_settings(path))


# ------------------------------------------------------------------------------------- loopback deployment

PROBE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "probeapp"
version = "0.1.0"
dependencies = ["numpy"]
[tool.hatch.build.targets.wheel]
packages = ["probeapp"]
[tool.flwr.app]
publisher = "fedprog-tests"
[tool.flwr.app.components]
serverapp = "probeapp.server_app:app"
clientapp = "probeapp.client_app:app"
[tool.flwr.app.config]
rounds = 2
out = ""
resume = ""
min-nodes = 2
round-sleep = 0.0
"""

PROBE_CLIENT = '''
"""Probe ClientApp: returns the weights plus one and its site name (from node-config)."""
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = [a + 1.0 for a in msg.content["arrays"].to_numpy_ndarrays()]
    site = str(context.node_config.get("site", "?"))
    content = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1}),
               "site": ConfigRecord({"site": site})}
    return Message(RecordDict(content), reply_to=msg)
'''

PROBE_SERVER = '''
"""Probe ServerApp: rounds of averaging over the nodes; rounds.csv, checkpoints, results.json in out."""
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out = Path(str(cfg["out"]))
    out.mkdir(parents=True, exist_ok=True)
    start, weights = 0, [np.zeros(3)]
    if cfg.get("resume"):
        newest = sorted((Path(str(cfg["resume"])) / "checkpoints").glob("round-*/state.json"))[-1]
        state = json.loads(newest.read_text())
        start, weights = state["round"], [np.array(state["w"])]
    deadline = time.time() + 60
    while len(grid.get_node_ids()) < int(cfg["min-nodes"]) and time.time() < deadline:
        time.sleep(0.5)
    for rnd in range(start + 1, int(cfg["rounds"]) + 1):
        content = RecordDict({"arrays": ArrayRecord(weights)})
        nodes = grid.get_node_ids()
        msgs = [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]
        replies = [r for r in grid.send_and_receive(msgs, timeout=60) if not r.has_error()]
        weights = [np.mean([r.content["arrays"].to_numpy_ndarrays()[0] for r in replies], axis=0)]
        with (out / "rounds.csv").open("a") as handle:
            handle.write("".join(f"{rnd},{r.content['site']['site']}\\n" for r in replies))
        folder = out / "checkpoints" / f"round-{rnd:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps({"round": rnd, "w": weights[0].tolist()}))
        time.sleep(float(cfg["round-sleep"]))
    (out / "results.json").write_text(json.dumps({"w": weights[0].tolist(), "rounds": int(cfg["rounds"])}))
'''


def _probe_app(root: Path) -> Path:
    app = root / "probe"
    (app / "probeapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "probeapp" / "__init__.py").write_text('"""Probe Flower app for the deployment tests."""\n')
    (app / "probeapp" / "client_app.py").write_text(textwrap.dedent(PROBE_CLIENT))
    (app / "probeapp" / "server_app.py").write_text(textwrap.dedent(PROBE_SERVER))
    return app


class Deployment:
    """A loopback consortium in ``root``: certificates, server and site configs (processes: ``started``)."""

    def __init__(
        self, root: Path, started: list[processes.ManagedProcess], sites: list[str], **server_keys: object
    ):
        self.root, self.started = root, started
        self.certs = root / "certs"
        make_certificates(self.certs, ["localhost", "127.0.0.1"], [*sites, "rogue"])
        self.port = processes.free_port()
        keys: dict[str, object] = {
            "certs": {
                "ca": str(self.certs / "ca.crt"),
                "cert": str(self.certs / "server.crt"),
                "key": str(self.certs / "server.key"),
            },
            "port": self.port,
            "database": str(root / "srv" / "state.db"),
            "flwr_home": str(root / "srv" / "home"),
            "state_dir": str(root / "srv"),
            "audit": str(root / "srv" / "audit.jsonl"),
            "out": str(root / "report"),
            "sites": {name: str(self.certs / f"nodes/{name}.pub") for name in sites},
            "echo": False,
        }
        keys.update(server_keys)
        OmegaConf.save(OmegaConf.create(keys), root / "server.yaml")
        self.settings = server.load_settings(load_config("server", [f"config={root / 'server.yaml'}"]))

    def start_link(self) -> processes.ManagedProcess:
        link = server.start_superlink(self.settings)
        self.started.append(link)
        return link

    def site(self, name: str, **keys: object) -> object:
        base: dict[str, object] = {
            "site": name,
            "data_root": str(self.root),
            "cohort": "x",
            "server": f"127.0.0.1:{self.port}",
            "ca": str(self.certs / "ca.crt"),
            "key": str(self.certs / f"nodes/{name}.key"),
            "port": processes.free_port(),
            "state_dir": str(self.root / name),
            "check_data": False,
            "startup_grace_s": 0.5,
            "process_model": "per_message",
        }
        base.update(keys)
        return _site_settings(_site_file(self.root / f"{name}.yaml", **base))

    def start_site(self, name: str, **keys: object) -> None:
        self.started.extend(site.start_site(self.site(name, **keys)))

    def intruders(self, **keys: object) -> dict[str, processes.ManagedProcess]:
        """Start SuperNodes with an unregistered key, with no key and without the CA (all must be refused)."""
        limits = {"max_retries": 1, "max_wait_time": 10, **keys}
        variants = {
            "unregistered key": self.site("rogue", **limits),
            "no key": self.site("nokey", key=None, **limits),
            "no CA": self.site("noca", ca=None, key=str(self.certs / "nodes/rogue.key"), **limits),
        }
        running = {}
        for label, settings in variants.items():
            proc = processes.start_process(
                f"intruder ({label})",
                site.supernode_argv(settings),
                env=processes.flwr_env(settings.flwr_home),
                log_path=self.root / f"intruder-{label.replace(' ', '-')}.log",
            )
            self.started.append(proc)
            running[label] = proc
        return running


def _assert_refused(intruders: dict[str, processes.ManagedProcess]) -> None:
    for label, proc in intruders.items():
        code = processes.wait_for_exit(proc, timeout=30)
        assert code not in (None, 0), f"{label}: still running or exit 0\n{proc.log_tail()}"
        assert processes.flower_exit_code(proc.log_path) == site.EXIT_REFUSED, f"{label}:\n{proc.log_tail()}"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_loopback_probe_app_tls_node_auth(tmp_path: Path, started: list[processes.ManagedProcess]) -> None:
    """SuperLink (TLS + node auth), a warm and a per-message SuperNode, 2 rounds; a rogue key is refused."""
    dep = Deployment(
        tmp_path, started, ["a", "b"], app_dir=str(_probe_app(tmp_path)), run={"config_name": None}
    )
    link = dep.start_link()
    assert server.enrol_sites(dep.settings) == {"a": "registered", "b": "registered"}
    dep.start_site("a", process_model="warm", warm_preload=["numpy"])
    dep.start_site("b")
    with pytest.raises(processes.ProcessError, match=r"supernode-rogue exited .*Flower exit code 305"):
        site.start_site(dep.site("rogue", max_retries=0, max_wait_time=5, startup_grace_s=20))
    assert server.start_run(dep.settings) == 0
    rows = (tmp_path / "report" / "rounds.csv").read_text().split()
    assert sorted(rows) == ["1,a", "1,b", "2,a", "2,b"]
    assert json.loads((tmp_path / "report" / "results.json").read_text())["w"] == [2.0, 2.0, 2.0]
    events = [
        json.loads(line)["event"] for line in (tmp_path / "srv" / "audit.jsonl").read_text().splitlines()
    ]
    assert events[:3] == ["superlink_started", "supernode_enrolled", "supernode_enrolled"]
    assert events[-1] == "run_finished" and verify(tmp_path / "srv" / "audit.jsonl").ok
    assert server.collect_report(tmp_path / "report").keys() == {"results.json"}
    assert server.stop_superlink(dep.settings) is True
    assert not processes._group_alive(link.pid)
    assert site.stop_site(dep.site("a")) is True and site.stop_site(dep.site("b")) is True


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_superlink_restart_resumes_from_checkpoint(
    tmp_path: Path, started: list[processes.ManagedProcess]
) -> None:
    """The SuperLink is stopped mid-run and restarted on its database; `resume=auto` continues the run."""
    import threading

    dep = Deployment(
        tmp_path,
        started,
        ["a", "b"],
        app_dir=str(_probe_app(tmp_path)),
        run={"config_name": None},
        run_config={"rounds": 2, "round-sleep": 1.0},
        resume="auto",
    )
    dep.start_link()
    server.enrol_sites(dep.settings)
    dep.start_site("a")
    dep.start_site("b")
    codes: list[int] = []
    first = threading.Thread(target=lambda: codes.append(server.start_run(dep.settings)))
    first.start()
    checkpoint = tmp_path / "report" / "checkpoints" / "round-0001" / "state.json"
    deadline = time.monotonic() + 90
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "round 1 never finished"
    assert server.stop_superlink(dep.settings)
    assert not (tmp_path / "report" / "results.json").exists()
    dep.start_link()  # same database: the keys are still registered, the sites reconnect by themselves
    assert server.start_run(dep.settings) == 0
    first.join(timeout=60)
    print("interrupted run exit codes:", codes)
    assert len(codes) == 1 and codes[0] != 0  # the interrupted `flwr run` did not report success
    rounds = [int(row.split(",")[0]) for row in (tmp_path / "report" / "rounds.csv").read_text().split()]
    assert sorted(rounds) == [1, 1, 2, 2]  # round 1 was not re-done after the restart
    assert json.loads((tmp_path / "report" / "results.json").read_text())["w"] == [2.0, 2.0, 2.0]
    config = (tmp_path / "srv" / "run_config.toml").read_text()
    assert f'"resume" = "{(tmp_path / "report").resolve()}"' in config


def _fedprog_app(root: Path) -> Path:
    """A minimal app folder for `flwr run`: fedprog's components and run-config keys (code: the install)."""
    app = root / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [project]
            name = "fedprog-deploy-test"
            version = "0.1.0"
            description = "fedprog components for the loopback deployment test"
            license = "Apache-2.0"
            [tool.flwr.app]
            publisher = "fedprog"
            [tool.flwr.app.components]
            serverapp = "fedprog.federated.server_app:app"
            clientapp = "fedprog.federated.client_app:app"
            [tool.flwr.app.config]
            config-file = ""
            config-name = "simulate"
            overrides = ""
            """
        )
    )
    (app / "README.md").write_text("fedprog deployment test app\n")
    return app


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fedprog_deployment_with_intruders(tmp_path: Path, started: list[processes.ManagedProcess]) -> None:
    """fedprog's ServerApp/ClientApp over TLS + node auth: 2 training sites and 1 held-out site with their own
    generated data finish 2 rounds and write the report; three intruders are refused meanwhile."""
    pytest.importorskip("fedprog.federated.server_app")
    pytest.importorskip("fedprog.federated.client_app")
    from fed_helpers import tiny_config

    from fedprog.federated import simulation

    cancers = [
        "data.synth.cancers=[c0,c1,c2]",
        "data.synth.n_patients=[40,30,30]",
        "data.synth.survival.weibull_scale=[60.0,40.0,50.0]",
        "data.synth.survival.weibull_shape=[1.2,1.0,1.1]",
        "data.synth.survival.censoring=[0.4,0.5,0.5]",
        "heldout=null",
    ]
    data = tmp_path / "data"
    tiny = tiny_config(data, tmp_path / "unused", *cancers)
    simulation.prepare(tiny)
    overrides = [
        f"data.root={data}",
        "rounds=2",
        "node_wait_timeout=60",
        *cancers,
        *[
            f"{key}={OmegaConf.select(tiny, key)}"
            for key in ("model.dim", "model.attn_dim", "model.head_hidden", "training.grad_accum")
        ],
        *[
            f"data.synth.{key}={OmegaConf.to_container(tiny.data.synth)[key]}".replace(" ", "")
            for key in ("n_genes", "n_pathways", "feature_dim", "patches", "site_fractions")
        ],
    ]
    sites = {"h0": ("c0", "train"), "h1": ("c1", "train"), "h2": ("c2", "holdout")}
    dep = Deployment(
        tmp_path,
        started,
        list(sites),
        app_dir=str(_fedprog_app(tmp_path)),
        run={"config_name": "simulate", "overrides": overrides},
    )
    dep.start_link()
    server.enrol_sites(dep.settings)
    for name, (cohort, role) in sites.items():
        dep.start_site(
            name, data_root=str(data), cohort=cohort, role=role, check_data=True, process_model="warm"
        )
    intruders = dep.intruders()
    assert server.start_run(dep.settings) == 0, (tmp_path / "srv" / "run.log").read_text()[-4000:]
    out = tmp_path / "report"
    for name in ("results.json", "report.md", "rounds.csv", "checkpoints/round-0002/state.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = pd.read_csv(out / "rounds.csv")
    assert set(rounds["site"]) == set(sites)
    assert set(rounds.loc[rounds.site == "h2", "role"]) == {"holdout"}
    _assert_refused(intruders)
    assert verify(tmp_path / "srv" / "audit.jsonl").ok
