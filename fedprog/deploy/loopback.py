"""A whole consortium on one machine: rehearse a deployment before the hospitals do it for real.

:class:`LoopbackConsortium` builds, in one folder, what ``fedprog certs``, ``fedprog server start|enrol|run``
and ``fedprog site start`` use: a consortium CA with a SuperLink certificate and one node key per site, a
generated dataset (one cancer per hospital, :func:`synth_sites`), the server config (TLS, node
authentication, the repository app) and one site config per hospital, warm and pinned to the app's FAB hash.
It starts the SuperLink and the SuperNodes through :mod:`fedprog.deploy.server` and :mod:`fedprog.deploy.site`
(the same functions as the CLI) and stops every process it started by PID (:meth:`LoopbackConsortium.stop`,
or leaving the ``with`` block)::

    sites, data = synth_sites(8)
    with LoopbackConsortium(Path("runs/loopback"), sites, data_overrides=data) as dep:
        dep.start()                # SuperLink, enrolment, 8 warm SuperNodes
        dep.wait_warm(timeout=300)
        assert server.start_run(dep.run_settings("run", "rounds=2")) == 0

Used by ``tests/test_deploy.py`` and ``simulations/deploy_scale.py``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from omegaconf import DictConfig, OmegaConf

from fedprog.config import load_config
from fedprog.deploy import processes, server, site
from fedprog.deploy.certs import CA_CERT, NODES_DIR, SERVER_CERT, SERVER_KEY, make_certificates

APP_DIR = Path(__file__).resolve().parents[2]  # the repository root: the fedprog Flower app (pyproject.toml)
HOSTS = ("localhost", "127.0.0.1")  # SANs of the SuperLink certificate
PATIENTS_PER_SITE = 30  # enough for each site's disclosure minimum (10 cases, 3 events)
# Per-cancer survival parameters, cycled over the cancers (3 sites: the values of tests/test_deploy.py).
WEIBULL_SCALE = (60.0, 40.0, 50.0)
WEIBULL_SHAPE = (1.2, 1.0, 1.1)
CENSORING = (0.4, 0.5, 0.5)
TINY_DATA = [  # small bags, features and gene panels: a round costs well under a second per site
    "data.synth.site_fractions=[1.0]",
    "data.synth.patches=[4,8]",
    "data.synth.n_genes=24",
    "data.synth.n_pathways=4",
    "data.synth.feature_dim=8",
]
TINY_RUN = [  # a tiny model and one local epoch per round
    "heldout=null",  # the documented way: each site's role comes from its node-config (role='holdout')
    "node_wait_timeout=120",
    "model.dim=8",
    "model.attn_dim=8",
    "model.head_hidden=8",
    "training.epochs=1",
    "training.grad_accum=1",
    "round_timeout=120",
]
SERVER_STOP_TIMEOUT_S = 5  # uvicorn waits for the streaming `flwr run` connection: SIGKILL after 5 s
SITE_STARTUP_GRACE_S = 0.5
SITE_TORCH_THREADS = 1  # the sites share a small machine
POLL_S = 0.05


def synth_sites(n_sites: int, holdout: int = 1) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Return ``n_sites`` hospitals ``h0..`` (one generated cancer ``c0..`` each) and their data overrides.

    The last ``holdout`` hospitals are held out (role ``holdout``); the others train.

    Returns
    -------
    tuple[dict[str, tuple[str, str]], list[str]]
        Site name -> (cohort, role), and the ``data.synth`` Hydra overrides of the generated dataset.
    """
    if not 1 <= holdout < n_sites:
        raise ValueError(f"synth_sites: holdout={holdout} must be between 1 and n_sites - 1 ({n_sites - 1})")
    cancers = [f"c{k}" for k in range(n_sites)]
    sites = {
        f"h{k}": (cancer, "holdout" if k >= n_sites - holdout else "train")
        for k, cancer in enumerate(cancers)
    }

    def per_cancer(values: Sequence[float]) -> str:
        return "[" + ",".join(str(v) for v in itertools.islice(itertools.cycle(values), n_sites)) + "]"

    overrides = [
        f"data.synth.cancers=[{','.join(cancers)}]",
        f"data.synth.n_patients={per_cancer([PATIENTS_PER_SITE])}",
        *TINY_DATA,
        f"data.synth.survival.weibull_scale={per_cancer(WEIBULL_SCALE)}",
        f"data.synth.survival.weibull_shape={per_cancer(WEIBULL_SHAPE)}",
        f"data.synth.survival.censoring={per_cancer(CENSORING)}",
    ]
    return sites, overrides


def load_site(path: Path) -> DictConfig:
    """Load a site config file the way ``fedprog site start PATH`` does."""
    return site.load_settings(load_config("site", [f"config={path}"]))


class LoopbackConsortium:
    """A loopback consortium in ``root``: certificates, data, server settings; processes go in ``running``.

    Parameters
    ----------
    root : Path
        Folder for everything (certificates, data, server and site state, reports); fresh per consortium.
    sites : Mapping[str, tuple[str, str]]
        Site name -> (cohort, role), e.g. from :func:`synth_sites`.
    data_overrides : Sequence[str]
        Hydra overrides of the generated dataset (``data.synth.*``), generated under ``root/data``.
    run_overrides : Sequence[str]
        Hydra overrides of every run (``expected_sites`` is added: all sites).
    extra_keys : Sequence[str]
        More node keys to make (not enrolled), e.g. an intruder's.
    running : list | None
        List that collects the started processes (a new one when None).
    """

    def __init__(
        self,
        root: Path,
        sites: Mapping[str, tuple[str, str]],
        *,
        data_overrides: Sequence[str],
        run_overrides: Sequence[str] = tuple(TINY_RUN),
        extra_keys: Sequence[str] = (),
        running: list[processes.ManagedProcess] | None = None,
    ) -> None:
        from fedprog.data.synth import ensure_generated

        self.root, self.sites = Path(root), dict(sites)
        self.running: list[processes.ManagedProcess] = [] if running is None else running
        self.startup_s: dict[str, float] = {}
        self.certs = self.root / "certs"
        make_certificates(self.certs, list(HOSTS), [*self.sites, *extra_keys])
        self.data = self.root / "data"
        cfg = load_config(
            "simulate", [f"data.root={self.data}", f"out={self.root / 'unused'}", *data_overrides]
        )
        ensure_generated(cfg.data)
        self.port = processes.free_port()
        run = [f"data.root={self.data}", *data_overrides, *run_overrides, f"expected_sites={len(self.sites)}"]
        keys = {
            "certs": {
                name: str(self.certs / f)
                for name, f in (("ca", CA_CERT), ("cert", SERVER_CERT), ("key", SERVER_KEY))
            },
            "port": self.port,
            "control_port": processes.free_port(),  # another consortium may hold the default port
            "database": str(self.root / "srv" / "state.db"),
            "flwr_home": str(self.root / "srv" / "home"),
            "state_dir": str(self.root / "srv"),
            "audit": str(self.root / "srv" / "audit.jsonl"),
            "sites": {name: str(self.certs / NODES_DIR / f"{name}.pub") for name in self.sites},
            "app_dir": str(APP_DIR),
            "run": {"config_name": "simulate", "overrides": run},
            "echo": False,
            "stop_timeout_s": SERVER_STOP_TIMEOUT_S,
        }
        OmegaConf.save(OmegaConf.create(keys), self.root / "server.yaml")
        self.settings = server.load_settings(load_config("server", [f"config={self.root / 'server.yaml'}"]))
        self.ports = {name: processes.free_port() for name in self.sites}
        # Every site pins the app `server run` submits (the repository snapshot): any other app is refused.
        self.app_hash = str(server.stage_app(APP_DIR, self.root / "pinned-app")["fab_sha256"])

    def __enter__(self) -> LoopbackConsortium:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start_link(self) -> processes.ManagedProcess:
        """Start the SuperLink (``fedprog server start``)."""
        link = server.start_superlink(self.settings)
        self.running.append(link)
        return link

    def site(self, name: str, **keys: object) -> DictConfig:
        """Write ``<root>/<name>.yaml`` (a warm site pinned to the app; ``keys`` override) and load it."""
        cohort, role = self.sites.get(name, ("c0", "train"))
        base: dict[str, object] = {
            "site": name,
            "data_root": str(self.data),
            "cohort": cohort,
            "role": role,
            "server": f"127.0.0.1:{self.port}",
            "ca": str(self.certs / CA_CERT),
            "key": str(self.certs / NODES_DIR / f"{name}.key"),
            "port": self.ports.get(name) or processes.free_port(),
            "state_dir": str(self.root / name),
            "startup_grace_s": SITE_STARTUP_GRACE_S,
            "process_model": "warm",
            "torch_threads": SITE_TORCH_THREADS,
            "app_hashes": [self.app_hash],
        }
        base.update(keys)
        path = self.root / f"{name}.yaml"
        OmegaConf.save(OmegaConf.create(base), path)
        return load_site(path)

    def start_site(self, name: str, **keys: object) -> list[processes.ManagedProcess]:
        """Start one site (``fedprog site start``: data check, SuperNode, warm SuperExec)."""
        started = site.start_site(self.site(name, **keys))
        self.running.extend(started)
        return started

    def start(self) -> dict[str, str]:
        """Start the SuperLink, enrol every site's key, start every site; return the enrolment outcomes.

        The seconds each step took are kept in :attr:`startup_s` (``superlink``, ``enrol``, ``sites``).
        """
        began = time.monotonic()
        self.start_link()
        linked = time.monotonic()
        enrolled = server.enrol_sites(self.settings)
        registered = time.monotonic()
        for name in self.sites:
            self.start_site(name)
        self.startup_s = {
            "superlink": linked - began,
            "enrol": registered - linked,
            "sites": time.monotonic() - registered,
        }
        return enrolled

    def wait_warm(self, timeout: float) -> float:
        """Wait until every site's warm SuperExec has preloaded the app; return the seconds waited."""
        started = time.monotonic()
        waiting = list(self.sites)
        while waiting:
            log = self.root / waiting[0] / site.SUPEREXEC_LOG
            if site.WARM_READY in processes.log_tail(log, lines=10_000):
                waiting.pop(0)
                continue
            if time.monotonic() - started > timeout:
                raise processes.ProcessError(
                    f"site {waiting[0]}: warm SuperExec not ready within {timeout:.0f} s; log {log}:\n"
                    f"{processes.log_tail(log)}"
                )
            time.sleep(POLL_S)
        return time.monotonic() - started

    def run_settings(self, name: str, *overrides: str, **keys: object) -> DictConfig:
        """Server settings of one run: report in ``<root>/<name>``, extra Hydra overrides, extra keys."""
        settings = OmegaConf.create(OmegaConf.to_container(self.settings))
        settings.out = str(self.root / name)
        settings.run.overrides = [*settings.run.overrides, *overrides]
        for key, value in keys.items():
            settings[key] = value
        return settings  # type: ignore[return-value]

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT_S) -> None:
        """Stop every started process by PID (SIGTERM, SIGKILL after ``timeout`` s)."""
        processes.stop_processes(self.running, timeout=timeout)
