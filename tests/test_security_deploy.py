"""Issue 8, deployment half: each test performs an attack or a fault on 127.0.0.1 and asserts it fails safely.

Fast tests check the launcher's refusals; the slow ones share one SuperLink (TLS, node authentication,
behind fedprog.deploy.gate) and start one SuperNode. Every process is stopped by its PID.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from fedprog.audit import verify
from fedprog.config import load_config
from fedprog.deploy import processes, server, site
from fedprog.deploy.certs import make_certificates
from fedprog.deploy.gate import FleetOnlyGate, is_loopback
from fedprog.deploy.pinned_supernode import pin_fabs

REPO = Path(__file__).resolve().parents[1]
HASH_A = "a" * 64
GATE_404 = '{"detail": "not served on the public Fleet address"}'


def _server_settings(root: Path, certs: Path, **keys: Any) -> DictConfig:
    values: dict[str, Any] = {
        "certs": {
            "ca": str(certs / "ca.crt"),
            "cert": str(certs / "server.crt"),
            "key": str(certs / "server.key"),
        },
        "address": "127.0.0.1",
        "public_host": "127.0.0.1",
        "port": processes.free_port(),
        "control_port": processes.free_port(),
        "database": str(root / "srv" / "state.db"),
        "flwr_home": str(root / "srv" / "home"),
        "state_dir": str(root / "srv"),
        "audit": str(root / "srv" / "audit.jsonl"),
        "sites": {"h0": str(certs / "nodes/h0.pub")},
        "echo": False,
        "stop_timeout_s": 5,
    }
    values.update(keys)
    OmegaConf.save(OmegaConf.create(values), root / "server.yaml")
    return server.load_settings(load_config("server", [f"config={root / 'server.yaml'}"]))


def _site_settings(root: Path, certs: Path, name: str = "h0", **keys: Any) -> DictConfig:
    values: dict[str, Any] = {
        "site": name,
        "data_root": str(root),
        "cohort": "c0",
        "ca": str(certs / "ca.crt"),
        "key": str(certs / f"nodes/{name}.key"),
        "server": "127.0.0.1:9",
        "port": processes.free_port(),
        "state_dir": str(root / name),
        "check_data": False,
        "app_hashes": [HASH_A],
        "tls_check_timeout_s": 0,
    }
    values.update(keys)
    path = root / f"{name}.yaml"
    OmegaConf.save(OmegaConf.create(values), path)
    return site.load_settings(load_config("site", [f"config={path}"]))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    make_certificates(folder, ["localhost"], ["h0", "rogue"])
    return folder


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another consortium's CA and server certificate (a wrong CA for ours)."""
    folder = tmp_path_factory.mktemp("other")
    make_certificates(folder, ["localhost"], ["h0"])
    return folder


def _forbid_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started although the launcher should have refused")

    monkeypatch.setattr(site, "start_process", forbidden)
    monkeypatch.setattr(server, "start_process", forbidden)


# ----------------------------------------------------------------------------------- launcher (finding 9)


def test_site_refuses_node_key_readable_by_others(
    certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "h0.key"
    key.write_bytes((certs / "nodes/h0.key").read_bytes())
    key.chmod(0o640)
    settings = _site_settings(tmp_path, certs, key=str(key))
    _forbid_processes(monkeypatch)
    with pytest.raises(site.SiteConfigError) as error:
        site.start_site(settings)
    message = str(error.value)
    assert "\n" not in message and f"key file {key}" in message and f"chmod 600 {key}" in message
    assert "mode 640" in message


def test_supernode_runtime_api_forced_to_loopback(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(site.SiteConfigError, match=r"runtime_host='0\.0\.0\.0' must be a loopback"):
        _site_settings(tmp_path, certs, runtime_host="0.0.0.0")
    argv = site.supernode_argv(_site_settings(tmp_path, certs))
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_control_api_host_must_be_loopback(certs: Path, tmp_path: Path) -> None:
    settings = _server_settings(tmp_path, certs, control_host="0.0.0.0")
    with pytest.raises(server.ServerConfigError, match=r"control_host='0\.0\.0\.0' must be a loopback"):
        server.superlink_argv(settings)
    settings = _server_settings(tmp_path, certs)
    settings.control_port = settings.port
    with pytest.raises(server.ServerConfigError, match="must differ from the Fleet"):
        server.superlink_argv(settings)


def test_gate_serves_only_fleet_and_health_off_the_control_port() -> None:
    gate = FleetOnlyGate(app=None, control_port=9092)  # type: ignore[arg-type]

    def scope(path: str, port: int, client: str = "127.0.0.1") -> dict[str, Any]:
        return {"type": "http", "path": path, "server": ("127.0.0.1", port), "client": (client, 5000)}

    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/pull-messages", "/docs"):
        assert not gate.allows(scope(path, 9093)), path
        assert gate.allows(scope(path, 9092)), path
        assert not gate.allows(scope(path, 9092, client="10.0.0.7")), path  # control port, remote peer
    assert gate.allows(scope("/v1/fleet/pull-messages", 9093)) and gate.allows(scope("/health", 9093))
    for sneaky in ("/v1/fleet/../control/start-run", "/v1/fleet//x", "/v1/fleet/./pull-messages"):
        assert not gate.allows(scope(sneaky, 9093)), sneaky
    assert is_loopback("localhost") and is_loopback("::1") and not is_loopback("0.0.0.0")


# ----------------------------------------------------------------------------- certificates (clear errors)


def test_site_missing_key_and_bad_ca_named_in_one_line(
    certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_processes(monkeypatch)
    missing = tmp_path / "nope.key"
    with pytest.raises(site.SiteConfigError, match=rf"site h0: key={missing} does not exist"):
        site.start_site(_site_settings(tmp_path, certs, key=str(missing)))
    with pytest.raises(site.SiteConfigError, match="site h0: key is not set"):
        site.start_site(_site_settings(tmp_path, certs, key=None))
    not_a_cert = tmp_path / "ca.crt"
    not_a_cert.write_text("hello")
    with pytest.raises(site.SiteConfigError, match=rf"site h0: {not_a_cert}: not a PEM certificate"):
        site.start_site(_site_settings(tmp_path, certs, ca=str(not_a_cert)))
    server_cert = certs / "server.crt"  # a certificate, but not a CA
    with pytest.raises(site.SiteConfigError, match=rf"{server_cert}: not a CA certificate"):
        site.start_site(_site_settings(tmp_path, certs, ca=str(server_cert)))


def test_server_certificate_always_covers_the_loopback_control_api(certs: Path) -> None:
    from fedprog.deploy.certs import check_server_files

    files = [certs / name for name in ("ca.crt", "server.crt", "server.key")]
    assert check_server_files(*files, hosts=["localhost", "127.0.0.1"]) == []  # made with hosts=[localhost]


def test_server_wrong_certificate_or_key_named_in_one_line(
    certs: Path, other_certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_processes(monkeypatch)
    wrong_ca = _server_settings(tmp_path, certs)
    wrong_ca.certs.ca = str(other_certs / "ca.crt")
    with pytest.raises(server.ServerConfigError) as error:
        server.start_superlink(wrong_ca)
    assert "\n" not in str(error.value)
    assert f"{certs / 'server.crt'}: not signed by the CA {other_certs / 'ca.crt'}" in str(error.value)
    wrong_key = _server_settings(tmp_path, certs)
    wrong_key.certs.key = str(other_certs / "server.key")
    with pytest.raises(server.ServerConfigError, match=rf"{other_certs / 'server.key'}: does not match"):
        server.start_superlink(wrong_key)
    uncovered = _server_settings(tmp_path, certs, public_host="hospital-gateway.example.org")
    with pytest.raises(server.ServerConfigError, match="'hospital-gateway.example.org' is not in the cert"):
        server.start_superlink(uncovered)


# ------------------------------------------------------------------------------- pinned app (finding 1b)


def test_site_refuses_to_start_without_a_pinned_app(
    certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_processes(monkeypatch)
    with pytest.raises(site.SiteConfigError, match="app_hashes is empty"):
        site.start_site(_site_settings(tmp_path, certs, app_hashes=[]))
    with pytest.raises(site.SiteConfigError, match="not a SHA-256 hex digest"):
        _site_settings(tmp_path, certs, app_hashes=["v1.0"])
    example = REPO / "sites/examples/synth_c0.yaml"  # examples pin nothing: the hash comes with the release
    assert list(site.load_settings(load_config("site", [f"config={example}"])).app_hashes) == []
    pinned = site.load_settings(load_config("site", [f"config={example}", f"app_hashes=[{HASH_A}]"]))
    assert list(pinned.app_hashes) == [HASH_A]
    argv = site.supernode_argv(_site_settings(tmp_path, certs))
    assert argv[1:3] == ["-m", "fedprog.deploy.pinned_supernode"]
    assert argv[argv.index("--app-hash") + 1] == HASH_A and "flower-supernode" in argv


def test_pin_fabs_turns_an_unpinned_fab_into_flowers_refusal() -> None:
    """The hook marks an unpinned FAB unverifiable (Flower then replies INVALID_FAB and stores nothing)."""
    seen: list[tuple[Any, dict[str, Any]]] = []

    def original(*, get_fab: Any, trusted_entities: Any, **_: Any) -> Any:
        fab = get_fab("h", 7)
        seen.append((fab.verifications, trusted_entities))
        return 7

    module = SimpleNamespace(_pull_and_store_message=original, _verify_fab=None)
    refused: list[tuple[int, str]] = []
    good, bad = b"consortium app", b"someone else's app"
    pin_fabs(module, [hashlib.sha256(good).hexdigest()], lambda run, digest: refused.append((run, digest)))
    for content in (good, bad):
        fab = SimpleNamespace(content=content, verifications={})
        module._pull_and_store_message(get_fab=lambda *_, fab=fab: fab, trusted_entities=None)
    assert [v["valid_license"] for v, _ in seen] == ["Valid", ""]
    assert all(trusted for _, trusted in seen)  # Flower's verification path is switched on
    assert refused == [(7, hashlib.sha256(bad).hexdigest())]
    assert module._verify_fab(SimpleNamespace(content=good), {}) and not module._verify_fab(
        SimpleNamespace(content=bad), {}
    )


# ----------------------------------------------------------------------------------- audit in deployment


def test_deployment_runs_audit_every_round_by_default(certs: Path, tmp_path: Path) -> None:
    settings = _server_settings(tmp_path, certs, out=str(tmp_path / "out"))
    composed = OmegaConf.load(server.run_config(settings)["config-file"])
    assert composed.audit.enabled is True and composed.audit.path == str(
        (tmp_path / "out").resolve() / "audit.jsonl"
    )
    settings.run.overrides = ["audit.enabled=false"]  # the operator's explicit choice wins
    assert OmegaConf.load(server.run_config(settings)["config-file"]).audit.enabled is False


# ------------------------------------------------------------------- live SuperLink (finding 1, slow tests)


class Link:
    """A SuperLink behind the gate with h0 enrolled; ``running`` holds every process to stop by PID."""

    def __init__(self, root: Path, certs: Path, running: list[processes.ManagedProcess]) -> None:
        self.root, self.certs, self.running = root, certs, running
        self.settings = _server_settings(root, certs)
        running.append(server.start_superlink(self.settings))
        assert server.enrol_sites(self.settings) == {"h0": "registered"}
        self.context = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def post(self, port: int, path: str) -> tuple[int, str]:
        """POST an empty protobuf body; return the HTTP status and the body."""
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}{path}",
            data=b"",
            headers={"Content-Type": "application/protobuf"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as response:
                return int(response.status), response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")

    def flwr(self, home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603
            ["flwr", *args],
            env=processes.flwr_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Link]:
    running: list[processes.ManagedProcess] = []
    try:
        yield Link(tmp_path_factory.mktemp("link"), certs, running)
    finally:
        processes.stop_processes(running, timeout=5)


def _nodes(listing: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """``(node id, status)`` of every node in ``flwr supernode list --format json`` output."""
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return sorted((n["node-id"], n["status"]) for n in json.loads(listing.stdout)["nodes"])


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ca_holder_cannot_reach_the_control_api(link: Link, tmp_path: Path) -> None:
    """With only ca.crt and the hospitals' address, nobody can register a key, start a run or drop a site."""
    fleet, control = int(link.settings.port), int(link.settings.control_port)
    assert _listening_addresses(control) == {"127.0.0.1"}  # the Control/Runtime socket is loopback only
    # The attack of finding 1: Flower's own CLI pointed at the public address with the consortium CA.
    home = tmp_path / "attacker"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "127.0.0.1:{fleet}"\n'
        f'root-certificates = "{link.certs / "ca.crt"}"\n'
    )
    rogue_pub = str(link.certs / "nodes/rogue.pub")
    legit_home = Path(str(link.settings.flwr_home))
    nodes = _nodes(link.flwr(legit_home, "supernode", "list", "fedprog", "--format", "json"))
    assert len(nodes) == 1  # h0, enrolled by the fixture through the loopback Control API
    for attack in (
        ["supernode", "register", rogue_pub, "target"],
        ["supernode", "unregister", nodes[0][0], "target"],
        ["run", str(_toy_app(tmp_path / "evil_app", "evil")), "target"],
    ):
        attempt = link.flwr(home, *attack)
        assert attempt.returncode != 0, (attack, attempt.stdout)
        assert "not served on the public Fleet address" in attempt.stdout + attempt.stderr, attack
    assert _nodes(link.flwr(legit_home, "supernode", "list", "fedprog", "--format", "json")) == nodes
    for path in (
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/control/unregister-node",
        "/v1/control/list-nodes",
        "/v1/runtime/pull-messages",  # ServerAppIo
        "/openapi.json",
        "/v1/fleet/../control/start-run",
    ):
        assert link.post(fleet, path) == (404, GATE_404), path
        assert link.post(control, path)[1] != GATE_404, path  # Flower answers it, but only on loopback
    status, body = link.post(fleet, "/v1/fleet/unregister-node")
    assert status == 401 and "Invalid SuperNode authentication" in body  # node auth refuses it
    # Nothing changed: the rogue key was never registered, h0 still is.
    assert server.enrol_sites(link.settings) == {"h0": "already registered"}
    link.settings.sites = {"rogue": rogue_pub}
    assert server.enrol_sites(link.settings) == {"rogue": "registered"}  # first registration: via loopback
    link.settings.sites = {"h0": str(link.certs / "nodes/h0.pub")}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_site_refuses_a_superlink_signed_by_another_ca(link: Link, other_certs: Path, tmp_path: Path) -> None:
    settings = _site_settings(
        tmp_path, link.certs, server=f"127.0.0.1:{link.settings.port}", tls_check_timeout_s=5
    )
    assert site.check_superlink_certificate(settings) == "verified"
    settings.ca = str(other_certs / "ca.crt")
    with pytest.raises(site.SiteConfigError) as error:
        site.check_superlink_certificate(settings)
    assert "\n" not in str(error.value) and f"ca={other_certs / 'ca.crt'}" in str(error.value)


TOY_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pinapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedprog"

[tool.flwr.app.components]
serverapp = "pinapp_server:app"
clientapp = "pinapp_client:app"

[tool.flwr.app.config]
marker = ""
out = ""
"""
TOY_SERVER = """
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    nodes = []
    while not nodes and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    query = RecordDict({"q": ConfigRecord({"x": 1})})
    messages = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=60))
    outcome = [f"error {r.error.code}" if r.has_error() else "reply" for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps(outcome))
"""
TOY_CLIENT = """
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
VARIANT = "{variant}"

@app.query()
def query(msg: Message, context: Context) -> Message:
    Path(str(context.run_config["marker"])).write_text(VARIANT)
    return Message(RecordDict({{"r": ConfigRecord({{"variant": VARIANT}})}}), reply_to=msg)
"""


def _toy_app(folder: Path, variant: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(TOY_PYPROJECT)
    (folder / "pinapp_server.py").write_text(TOY_SERVER)
    (folder / "pinapp_client.py").write_text(TOY_CLIENT.format(variant=variant))
    return folder


def _flwr_run(link: Link, app: Path, marker: Path, out: Path) -> subprocess.CompletedProcess[str]:
    server.write_connection(link.settings)
    config = out.with_suffix(".toml")
    config.write_text(f"marker = {json.dumps(str(marker))}\nout = {json.dumps(str(out))}\n")
    home = Path(str(link.settings.flwr_home))
    return link.flwr(home, "run", str(app), "fedprog", "--run-config", str(config), "--stream", timeout=150)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_site_runs_only_the_pinned_app(link: Link, tmp_path: Path) -> None:
    """A SuperNode pinned to app A refuses app B (none of B's code runs on the site) and runs app A."""
    pinned = _toy_app(tmp_path / "app_a", "A")
    other = _toy_app(tmp_path / "app_b", "B")
    pinned_hash = site.print_fab_hash(pinned)
    from flwr.cli.build import build_fab_from_disk

    assert pinned_hash == hashlib.sha256(build_fab_from_disk(pinned)).hexdigest()  # what `flwr run` submits
    settings = _site_settings(
        tmp_path,
        link.certs,
        server=f"127.0.0.1:{link.settings.port}",
        app_hashes=[pinned_hash],
        tls_check_timeout_s=5,
        startup_grace_s=1.0,
    )
    link.running.extend(site.start_site(settings))
    marker = tmp_path / "marker.txt"
    try:
        refused = _flwr_run(link, other, marker, tmp_path / "b.json")
        assert json.loads((tmp_path / "b.json").read_text()) == ["error 7"], refused.stdout[
            -2000:
        ]  # INVALID_FAB
        assert not marker.exists()  # app B's ClientApp never ran on the site
        accepted = _flwr_run(link, pinned, marker, tmp_path / "a.json")
        assert json.loads((tmp_path / "a.json").read_text()) == ["reply"], accepted.stdout[-2000:]
        assert marker.read_text() == "A"
    finally:
        site.stop_site(settings)
    log = (tmp_path / "h0" / site.SUPERNODE_LOG).read_text()
    assert "is not pinned by this site" in log
    events = [json.loads(line) for line in (tmp_path / "h0" / "audit.jsonl").read_text().splitlines()]
    refusals = [e for e in events if e["event"] == "app_refused"]
    assert len(refusals) >= 1 and all(e["fab_sha256"] != pinned_hash for e in refusals)
    assert verify(tmp_path / "h0" / "audit.jsonl").ok
