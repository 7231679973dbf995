from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from fedprog.audit import verify
from fedprog.config import load_config
from fedprog.deploy import processes, server, site
from fedprog.deploy.certs import make_certificates
from fedprog.deploy.loopback import LoopbackConsortium, synth_sites

REPO = Path(__file__).resolve().parents[1]
TINY_SYNTH = [
    "data.synth.n_patients=[40,40,40,40,40,40]",
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


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Site keys for tests that stop before connecting: a real CA and 0600 node key, any app, no TLS dial."""
    certs = tmp_path_factory.mktemp("certs")
    make_certificates(certs, ["localhost"], ["h0", "h9"])
    return {
        "ca": str(certs / "ca.crt"),
        "key": str(certs / "nodes/h0.key"),
        "allow_any_app": True,
        "tls_check_timeout_s": 0,
    }


@pytest.fixture
def started() -> Iterator[list[processes.ManagedProcess]]:
    """Every process a test starts goes in this list and is stopped by PID, also when the test fails."""
    running: list[processes.ManagedProcess] = []
    try:
        yield running
    finally:
        processes.stop_processes(running, timeout=3)


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


def test_stop_processes_stops_all_at_once(tmp_path: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    stubborn = [
        processes.start_process(
            f"stubborn{i}", [sys.executable, "-c", script], env={}, log_path=tmp_path / "s.log"
        )
        for i in range(3)
    ]
    time.sleep(0.5)
    started = time.monotonic()
    processes.stop_processes(stubborn, timeout=1.0)  # one shared grace period, then SIGKILL
    assert time.monotonic() - started < 2.5
    assert not any(processes._group_alive(proc.pid) for proc in stubborn)


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
    assert argv[:3] == [sys.executable, "-m", "fedprog.deploy.gate"]  # Flower's SuperLink behind the gate
    assert argv[argv.index("--public-host") + 1] == "0.0.0.0"
    assert argv[argv.index("--public-port") + 1] == "9093"
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "9092"
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--database",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ):
        assert flag in argv
    assert set(settings.sites) == {"blca", "brca", "hnsc", "stad"}
    settings.flwr_home = str(tmp_path / "home")
    text = server.write_connection(settings).read_text()
    assert (
        'default = "fedprog"' in text and 'address = "127.0.0.1:9092"' in text and "root-certificates" in text
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
    settings.run_config, settings.run.overrides = None, ["strategy=newton"]  # SurvPath: no Newton steps
    with pytest.raises(server.ServerConfigError, match="strategy=newton: model.name='survpath'"):
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
    creds: dict[str, object],
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
        state_dir=str(tmp_path / "state"),
        port=processes.free_port(),
        **creds,
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


def test_site_missing_data_folder(creds: dict[str, object], tmp_path: Path) -> None:
    path = _site_file(
        tmp_path / "s.yaml", site="h9", data_root=str(tmp_path / "nowhere"), cohort="c0", **creds
    )
    with pytest.raises(site.SiteDataError, match=r"site h9: data folder .*nowhere does not exist"):
        site.start_site(_site_settings(path))


# --------------------------------------------------------------------------------------------- app staging


def test_stage_app_snapshots_the_repository_app(tmp_path: Path) -> None:
    """The repository root is the Flower app: the snapshot holds its code and configs, not tests/runs."""
    summary = server.stage_app(REPO, tmp_path / "app")
    app = tmp_path / "app"
    for name in (
        "fedprog/federated/server_app.py",
        "fedprog/federated/client_app.py",
        "configs/simulate.yaml",
    ):
        assert (app / name).is_file(), name
    assert not (app / "tests").exists() and not (app / "runs").exists() and not (app / ".venv").exists()
    pyproject = (app / "pyproject.toml").read_text()
    assert "fab-exclude" not in pyproject and 'serverapp = "fedprog.federated.server_app:app"' in pyproject
    assert 'config-file = ""' in pyproject and 'overrides = ""' in pyproject
    assert summary["fab_bytes"] < 2 * 1024 * 1024  # Flower's cap is 10 MB
    with pytest.raises(server.AppStagingError, match="no pyproject.toml"):
        server.stage_app(tmp_path / "app" / "configs", tmp_path / "other")


def test_stage_app_applies_gitignore_and_fab_rules(tmp_path: Path) -> None:
    app = tmp_path / "src"
    for name in ("pkg/a.py", "pkg/data.csv", "skip/b.py", "ignored/c.py", ".hidden/d.py", "notes.txt"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text("x = 1\n")
    (app / ".gitignore").write_text("ignored/\n")
    (app / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [project]
            name = "stageprobe"
            version = "0.1.0"
            description = "staging probe"
            license = "Apache-2.0"
            [tool.flwr.app]
            publisher = "tests"
            fab-exclude = ["skip/**", "nothing/**", "pkg/*.csv", "notes.txt", ".gitignore"]
            [tool.flwr.app.components]
            serverapp = "pkg.a:app"
            clientapp = "pkg.a:app"
            """
        )
    )
    summary = server.stage_app(app, tmp_path / "out")
    staged = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*"))
    assert staged == ["pkg/a.py", "pyproject.toml"]
    assert summary["files"] == 1 and summary["unmatched_patterns"] == ["fab-exclude: nothing/**"]


# --------------------------------------------------------------------------------------------- missed rounds


def _fake_run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [(1, "h0", "train"), (1, "h1", "train"), (1, "h2", "holdout"), (2, "h0", "train")]
    rows += [(2, "h2", "holdout"), (3, "h0", "train"), (3, "h1", "train"), (3, "h2", "holdout")]
    pd.DataFrame(rows, columns=["round", "site", "role"]).assign(c_index=0.6).to_csv(
        out / "rounds.csv", index=False
    )
    results = {
        "sites": [
            {"site": "h0", "role": "train"},
            {"site": "h1", "role": "train"},
            {"site": "h2", "role": "holdout"},
        ],
        "rounds": [
            {"round": 1, "accepted": ["h0", "h1"]},
            {"round": 2, "accepted": ["h0"]},
            {"round": 3, "accepted": ["h0"]},
        ],
    }
    (out / "results.json").write_text(json.dumps(results))
    (out / "report.md").write_text("# fedprog simulate\n\n## Run\n\nStatus **completed**.\n")


def test_collect_report_marks_missed_rounds(tmp_path: Path) -> None:
    _fake_run(tmp_path)
    table = server.missing_rounds(tmp_path).set_index("site")
    assert table.loc["h1", "missed_eval_rounds"] == "2" and table.loc["h1", "missed_train_rounds"] == "2 3"
    assert table.loc["h0", "missed_eval_rounds"] == "-" and table.loc["h2", "missed_train_rounds"] == "n/a"
    hashes = server.collect_report(tmp_path)
    assert set(hashes) == {"results.json", "report.md", "missing_rounds.csv"}
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# fedprog simulate") and report.count("## Rounds missed per site") == 1
    assert "| h1 " in report and "2 3" in report
    server.collect_report(tmp_path)  # idempotent: the section is replaced, not repeated
    assert (tmp_path / "report.md").read_text() == report
    assert server.missing_rounds(tmp_path / "none") is None and server.collect_report(tmp_path / "none") == {}
    own = "# r\n\n## Rounds missed per site\n\n(written by the ServerApp)\n"
    (tmp_path / "report.md").write_text(own)
    server.collect_report(tmp_path)  # a report that has the table already is left alone
    assert (tmp_path / "report.md").read_text() == own


# ------------------------------------------------------------------------------------- loopback deployment
#
# One consortium per module (certificates, tiny data for three hospitals, a SuperLink with TLS and node
# authentication, three warm SuperNodes) serves the two slow tests below, in file order: the main run (with
# intruders and a site that leaves and rejoins), then a SuperLink restart with resume. Every process is
# stopped by its PID when the module ends, also when a test fails.

SITES, CANCERS = synth_sites(3)  # h0, h1 train on c0, c1; h2 holds out c2
POLL_S = 0.05


class Consortium(LoopbackConsortium):
    """The module's consortium: three hospitals, plus a key for the rogue SuperNode (never enrolled)."""

    def __init__(self, root: Path, running: list[processes.ManagedProcess]) -> None:
        super().__init__(root, SITES, data_overrides=CANCERS, extra_keys=["rogue"], running=running)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    pytest.importorskip("fedprog.federated.server_app")
    running: list[processes.ManagedProcess] = []
    try:
        dep = Consortium(tmp_path_factory.mktemp("consortium"), running)
        assert dep.start() == {name: "registered" for name in SITES}  # sites' data checked first
        yield dep
    finally:
        processes.stop_processes(running, timeout=5)


def _wait_for(path: Path, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, (
            f"{what} not reached within {timeout:.0f} s:\n{processes.log_tail(log)}"
        )
        time.sleep(POLL_S)


def _wait_for_line(path: Path, text: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while processes.log_tail(path, lines=10_000).count(text) < count:
        assert time.monotonic() < deadline, (
            f"{path}: {text!r} not logged {count}x:\n{processes.log_tail(path)}"
        )
        time.sleep(POLL_S)


def _start_in_background(function, *args: object) -> tuple[threading.Thread, list[object]]:  # noqa: ANN001
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(function(*args))
        except Exception as error:  # noqa: BLE001 - handed to the test thread, which asserts on it
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_deployment_with_intruders_and_a_site_that_leaves(
    consortium: Consortium, started: list[processes.ManagedProcess]
) -> None:
    """The main deployment run over TLS + node authentication, 3 rounds.

    Training sites h0 and h1 and held-out site h2 (role from its node-config, ``heldout=null``) with their own
    generated data. Meanwhile a SuperNode with an unregistered key, one with no key and one without the CA
    are refused (Flower exit code 305). h1 is stopped by PID after round 1 and restarted after round 2: the
    ServerApp goes on without it (``min_train_sites=1``), its rows are missing from rounds.csv for round 2
    only, and the report's "Rounds missed per site" table marks round 2 (evaluation) and 2-3 (training).
    """
    dep = consortium
    settings = dep.run_settings("run", "rounds=3", "min_train_sites=1")
    out, run_log = Path(settings.out), dep.root / "srv" / "run.log"
    limits = {"max_retries": 1, "max_wait_time": 10, "process_model": "per_message", "check_data": False}
    rogue_settings = dep.site("rogue", startup_grace_s=60, **limits)  # Hydra composes in this thread only

    def rogue_start() -> list[processes.ManagedProcess]:
        launched = site.start_site(rogue_settings)
        started.extend(launched)  # not expected: refused before the grace period ends
        return launched

    rogue, rogue_outcome = _start_in_background(rogue_start)
    intruders = {
        "no key": dep.site("nokey", key=None, **limits),
        "no CA": dep.site("noca", ca=None, key=str(dep.certs / "nodes/rogue.key"), **limits),
    }
    for label, intruder in intruders.items():
        started.append(
            processes.start_process(
                f"intruder ({label})",
                site.supernode_argv(intruder),
                env=processes.flwr_env(intruder.flwr_home),
                log_path=dep.root / f"intruder-{label.replace(' ', '-')}.log",
            )
        )
    h1_settings, h1_log = dep.site("h1", check_data=False), dep.root / "h1" / site.SUPERNODE_LOG
    runner, outcome = _start_in_background(server.start_run, settings)

    _wait_for(out / "checkpoints/round-0001/state.json", 240, "round 1", run_log)
    assert site.stop_site(h1_settings)  # SIGTERM by PID: the SuperNode leaves the SuperLink gracefully
    _wait_for(out / "checkpoints/round-0002/state.json", 120, "round 2 without h1", run_log)
    # Hold round 3 at h0 (a slow hospital) while h1 restarts, so that h1 is back before round 3's evaluation.
    h0 = processes.read_pid_file(dep.root / "h0" / site.SUPERNODE_PID)
    assert h0 is not None
    os.kill(h0, signal.SIGSTOP)
    try:
        logged = processes.log_tail(h1_log, 10_000).count("SuperNode ID")
        dep.running.extend(site.start_site(h1_settings))
        _wait_for_line(h1_log, "SuperNode ID", logged + 1, 60)
        _wait_for_line(dep.root / "h1" / site.SUPEREXEC_LOG, site.WARM_READY, 2, 90)
    finally:
        os.kill(h0, signal.SIGCONT)
    runner.join(timeout=240)
    assert outcome == [0], (outcome, processes.log_tail(run_log, 80))

    for name in (
        "results.json",
        "report.md",
        "rounds.csv",
        "missing_rounds.csv",
        "checkpoints/round-0003/state.json",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed" and results["rounds_completed"] == 3
    assert {s["site"]: s["role"] for s in results["sites"]} == {
        name: role for name, (_, role) in SITES.items()
    }
    assert [r["accepted"] for r in results["rounds"]] == [["h0", "h1"], ["h0"], ["h0"]]  # h2 never trains
    rounds = pd.read_csv(out / "rounds.csv")
    by_site = {name: sorted(rounds.loc[rounds.site == name, "round"]) for name in SITES}
    assert by_site == {"h0": [1, 2, 3], "h1": [1, 3], "h2": [1, 2, 3]}  # h1: away in round 2, back in 3
    assert set(rounds.loc[rounds.site == "h2", "role"]) == {"holdout"}
    missed = pd.read_csv(out / "missing_rounds.csv", dtype=str).set_index("site")
    assert missed.loc["h1", "missed_eval_rounds"] == "2" and missed.loc["h1", "missed_train_rounds"] == "2 3"
    assert set(missed.loc[["h0", "h2"], "missed_eval_rounds"]) == {"-"}
    report = (out / "report.md").read_text()
    assert re.search(r"\| h1 +\| train +\| +2 \| +2 3 \|", report), report[-800:]

    rogue.join(timeout=60)
    assert len(rogue_outcome) == 1 and isinstance(rogue_outcome[0], processes.ProcessError), rogue_outcome
    assert re.search(r"supernode-rogue exited .*Flower exit code 305", str(rogue_outcome[0]))
    for proc in started:
        assert processes.wait_for_exit(proc, timeout=30) not in (None, 0), proc.log_tail()
        assert processes.flower_exit_code(proc.log_path) == site.EXIT_REFUSED, proc.log_tail()

    audit = dep.root / "srv" / "audit.jsonl"
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events[:4]] == ["superlink_started", *["supernode_enrolled"] * 3]
    submitted = next(e for e in events if e["event"] == "run_submitted")
    assert submitted["staged"]["files"] > 10 and submitted["staged"]["fab_bytes"] < 2 * 1024 * 1024
    assert events[-1]["event"] == "run_finished" and "missing_rounds.csv" in events[-1]["report"]
    assert verify(audit).ok
    # Audit in deployment by default: the ServerApp's own log holds every round, anchored in the launcher's.
    run_audit = out / "audit.jsonl"
    run_events = [json.loads(line) for line in run_audit.read_text().splitlines()]
    assert [e["round"] for e in run_events if e["event"] == "train_sent"] == [1, 2, 3]
    assert [e["round"] for e in run_events if e["event"] == "round_evaluated"] == [1, 2, 3]
    assert any(e["event"] == "update_accepted" for e in run_events)
    anchor = events[-1]["run_audit"]
    assert anchor["entries"] == len(run_events)
    assert verify(run_audit, expect_hash=anchor["last_hash"], expect_entries=anchor["entries"]).ok


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_superlink_restart_resumes_fedprog_run(consortium: Consortium) -> None:
    """The SuperLink is stopped by PID after round 1 and restarted on its database; `server run` with
    `resume: auto` continues the fedprog run from its round-1 checkpoint and completes it."""
    dep = consortium
    settings = dep.run_settings("restart", "rounds=2", resume="auto")  # audited by default
    out = Path(settings.out)
    run_log = dep.root / "srv" / "run.log"
    first, outcome = _start_in_background(server.start_run, settings)
    _wait_for(out / "checkpoints/round-0001/state.json", 240, "round 1", run_log)
    assert server.stop_superlink(settings)
    assert not (out / "results.json").exists()
    dep.start_link()  # same database: keys still registered; the SuperNodes reconnect by themselves
    assert server.start_run(settings) == 0, processes.log_tail(run_log, 80)
    first.join(timeout=120)
    assert len(outcome) == 1 and outcome[0] != 0  # the interrupted `flwr run` did not report success

    composed = OmegaConf.load(dep.root / "srv" / "run_config.yaml")
    assert composed.resume == str(out.resolve())
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    # The ServerApp's own audit trail: the resumed run started from the checkpoint and only trained round 2.
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    starts = [i for i, e in enumerate(events) if e["event"] == "run_started"]
    assert len(starts) == 2 and events[starts[1]]["resume"] == str(out.resolve())
    assert [e["round"] for e in events[starts[1] :] if e["event"] == "train_sent"] == [2]
    assert verify(out / "audit.jsonl").ok
    rounds = pd.read_csv(out / "rounds.csv")
    assert sorted(zip(rounds["round"], rounds["site"], strict=True)) == [
        (r, s) for r in (1, 2) for s in sorted(SITES)
    ]
    assert (out / "checkpoints/round-0002/state.json").is_file()


def test_site_node_config_carries_its_state_dir_and_own_disclosure_limits(
    tmp_path: Path, tiny_data: Path, creds: dict[str, object]
) -> None:
    path = _site_file(
        tmp_path / "h0.yaml",
        site="h0",
        data_root=str(tiny_data),
        cohort="c0",
        state_dir=str(tmp_path / "state"),
        disclosure={"min_events": 7, "km_max_points": 8},
        **creds,
    )
    line = site.node_config(_site_settings(path))
    assert f"state-dir='{(tmp_path / 'state' / 'optimizer').resolve()}'" in line
    assert "min-events='7'" in line and "km-max-points='8'" in line
    bad = _site_file(
        tmp_path / "h9.yaml",
        site="h9",
        data_root=str(tiny_data),
        cohort="c0",
        disclosure={"min_event": 1},
        **creds,
    )
    with pytest.raises(site.SiteConfigError, match="disclosure key 'min_event' is unknown"):
        _site_settings(bad)
