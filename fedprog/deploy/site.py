"""Hospital side: ``fedprog site start sites/examples/<site>.yaml`` checks the data, then starts a SuperNode.

One config file per hospital (merged over the defaults of ``configs/site.yaml``): site name, data folder,
cohort, role (``train`` | ``holdout``), device, SuperLink address, consortium CA, the site's node private key,
the local Runtime API port, the pinned app hash(es) and the audit log. ``start`` refuses - starting no
process at all, with one line naming the key or file - when the CA or key is missing or unusable, the key
file is readable by group/others, no app is pinned (``app_hashes``), the Runtime API host is not loopback,
or the SuperLink's certificate fails verification with the site's CA. It then runs the same checks as
``fedprog data check`` on the local cohort and refuses to connect when they fail, with the data layer's error
(which names the file, column, case or site). Then it starts::

    python -m fedprog.deploy.pinned_supernode --app-hash H -- flower-supernode --root-certificates CA
        --auth-supernode-private-key KEY --superlink HOST:PORT --host 127.0.0.1 --port P
        --node-config "site='..' data-root='..' cohort='..' role='..' device='..'"

(Flower's own SuperNode; the wrapper refuses any run whose FAB SHA-256 is not pinned, see
:mod:`fedprog.deploy.pinned_supernode`.)

Process model (``process_model``):

- ``per_message`` (Flower's default ``--isolation subprocess``): the SuperNode starts a fresh
  ``flwr-clientapp`` process for every message; each one imports torch and fedprog again (about 4 s on CPU)
  and reloads the data. Simple and robust: nothing survives between rounds.
- ``warm``: ``flower-supernode --isolation process`` plus one long-lived SuperExec started here
  (``python -m fedprog.deploy.site warm-superexec``) that imports torch, Flower and the modules listed in
  ``warm_preload`` once, then *forks* a child per message that runs Flower's own ``run_clientapp``. Each
  message then starts in milliseconds with the imports (and whatever those modules cache at import) already in
  memory. ``warm_preload`` includes ``torch._dynamo`` because ``torch.optim`` imports it lazily (~3 s per
  training message otherwise); ``torch_threads`` caps torch's threads in every task (evaluation sets none, and
  oversubscribed OpenMP threads made a 0.1 s evaluation take 6 s with three sites on 2 cores);
  ``task_poll_s`` is how often the SuperExec asks its SuperNode for a new task (Flower's default: 1 s).
  Flower 1.42's open-source ``flower-superexec`` also needs ``--isolation process`` but still launches a new
  ``flwr-clientapp`` per message (its warm pool is Kubernetes-only), so it would not save the imports.

Leaving and rejoining: ``fedprog site stop`` (SIGTERM by PID) deactivates the node at once, so the server
leaves it out of the next round (messages already sent to it come back as "node unavailable") and the same
key can rejoin immediately - the node keeps its id. A SuperNode killed without warning (SIGKILL, power loss)
stays "online" on the SuperLink until its heartbeat expires (2 x 30 s in Flower 1.42); until then the server
waits ``round_timeout`` for it, and a restarted SuperNode with that key is refused activation (HTTP 412, exit
code 305; read from Flower 1.42's link state, not exercised by the tests), so restart it after about a minute.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedprog.audit import AuditLog
from fedprog.data.sites import ROLES
from fedprog.deploy.processes import (
    ManagedProcess,
    ProcessError,
    flower_exit_code,
    flwr_env,
    read_pid_file,
    start_process,
    stop_process,
    stop_processes,
    wait_for_exit,
)
from fedprog.device import DeviceError, resolve_device
from fedprog.federated.disclosure import LIMITS as DISCLOSURE_LIMITS
from fedprog.federated.site_state import STATE_NODE_KEY

logger = logging.getLogger(__name__)
_HEX64 = re.compile(r"[0-9a-f]{64}")

PROCESS_MODELS = ("warm", "per_message")
SUPERNODE_PID = "supernode.pid"
SUPEREXEC_PID = "superexec.pid"
SUPERNODE_LOG = "supernode.log"
SUPEREXEC_LOG = "superexec.log"
WARM_READY = "warm SuperExec: preloaded"  # logged by the warm SuperExec once the app is imported
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's SuperExec reads its task poll period here
EXIT_REFUSED = (
    305  # Flower's exit code (logged; the process status is 1) when the SuperLink refuses a SuperNode
)


class SiteConfigError(ValueError):
    """The site config is incomplete or inconsistent; the message names the config file and key."""


class SiteDataError(RuntimeError):
    """The local data failed the ``fedprog data check`` checks; the SuperNode was not started."""


# --------------------------------------------------------------------------------------------- config


def load_settings(cfg: DictConfig) -> DictConfig:
    """Merge the site config file ``cfg.config`` over the defaults of ``configs/site.yaml``.

    When the file names a ``data_config`` (a ``configs/data/<name>.yaml``), that layout replaces the default
    ``data`` group before the file's own keys are applied; ``data.root`` and ``data.cohorts`` then come from
    ``data_root`` and ``cohort``.

    Parameters
    ----------
    cfg : DictConfig
        Composed ``configs/site.yaml``; ``cfg.config`` is the hospital's config file.

    Returns
    -------
    DictConfig
        Resolved, validated settings.
    """
    path = cfg.get("config")
    if not path:
        raise SiteConfigError("fedprog site start: give the site config file, e.g. sites/examples/blca.yaml")
    path = Path(str(path))
    if not path.is_file():
        raise SiteConfigError(f"site config file {path} does not exist")
    own = OmegaConf.load(path)
    base = cfg
    data_config = own.get("data_config")
    if data_config:
        from fedprog.config import load_config

        base = load_config("site", [f"data={data_config}"])
    settings = OmegaConf.merge(OmegaConf.masked_copy(base, [k for k in base if k != "config"]), own)
    settings.config_file = str(path)
    OmegaConf.resolve(settings)
    where = f"site config {path}"
    for key in ("site", "data_root", "cohort", "role", "device", "server", "port", "state_dir", "flwr_home"):
        if OmegaConf.is_missing(settings, key) or settings.get(key) in (None, ""):
            raise SiteConfigError(f"{where}: key {key!r} is not set")
    unknown = sorted(set(settings.get("disclosure") or {}) - set(DISCLOSURE_LIMITS))
    if unknown:
        raise SiteConfigError(
            f"{where}: disclosure key {unknown[0]!r} is unknown; choose from {', '.join(DISCLOSURE_LIMITS)}"
        )
    if settings.role not in ROLES:
        raise SiteConfigError(f"{where}: role={settings.role!r}, expected one of {list(ROLES)}")
    try:  # the hospital's training device (node-config `device`, wins over the run's training.device)
        resolve_device(str(settings.device), key="device")
    except DeviceError as error:
        raise SiteConfigError(f"{where}: {error}") from error
    if settings.process_model not in PROCESS_MODELS:
        raise SiteConfigError(
            f"{where}: process_model={settings.process_model!r}, expected one of {list(PROCESS_MODELS)}"
        )
    from fedprog.deploy.gate import is_loopback

    if not is_loopback(str(settings.runtime_host)):
        raise SiteConfigError(
            f"{where}: runtime_host={settings.runtime_host!r} must be a loopback address (127.0.0.1): the "
            "SuperNode's local Runtime API hands out tasks and data without authentication"
        )
    for value in settings.app_hashes or []:
        if not _HEX64.fullmatch(str(value).lower()):
            raise SiteConfigError(f"{where}: app_hashes entry {value!r} is not a SHA-256 hex digest")
    for key in ("site", "cohort", "data_root", "role", "device"):
        if "'" in str(settings[key]):
            raise SiteConfigError(f"{where}: {key}={settings[key]!r} must not contain a single quote")
    settings.data.root = str(settings.data_root)
    settings.data.cohorts = [str(settings.cohort)]
    return settings  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- data check


def check_site_data(settings: DictConfig) -> Any:
    """Run the ``fedprog data check`` checks on this site's cohort; raise :class:`SiteDataError` on failure.

    Returns
    -------
    Any
        The data layer's summary (``fedprog.data.check.check_dataset``'s return value).
    """
    from fedprog.data import CohortError, DatasetLayout
    from fedprog.data.check import check_dataset

    root = Path(str(settings.data_root))
    if not root.is_dir():
        raise SiteDataError(f"site {settings.site}: data folder {root} does not exist")
    try:
        layout = DatasetLayout.load(settings.data)
        return check_dataset(layout)
    except CohortError as error:
        raise SiteDataError(f"site {settings.site}: data check failed, not connecting: {error}") from error
    except OSError as error:
        raise SiteDataError(
            f"site {settings.site}: cannot read the data ({error}); not connecting"
        ) from error


# --------------------------------------------------------------------------------------------- processes


def node_config(settings: DictConfig) -> str:
    """Return the ``--node-config`` string the ClientApp reads (site, data-root, cohort, role, device)."""
    values = {
        "site": settings.site,
        "data-root": str(Path(str(settings.data_root)).resolve()),
        "cohort": settings.cohort,
        "role": settings.role,
        "device": settings.device,
        STATE_NODE_KEY: str((Path(str(settings.state_dir)) / "optimizer").resolve()),
    }
    for name, value in (settings.get("disclosure") or {}).items():  # the site's own limits (its ClientApp)
        values[str(name).replace("_", "-")] = value
    return " ".join(f"{key}='{value}'" for key, value in values.items())


def supernode_argv(settings: DictConfig) -> list[str]:
    """Return the SuperNode command line for ``settings``.

    With ``app_hashes`` set: Flower's ``flower-supernode`` behind :mod:`fedprog.deploy.pinned_supernode`,
    which runs only those FABs; with ``allow_any_app: true`` and no hashes: plain ``flower-supernode``.
    The local Runtime API is always on ``runtime_host`` (loopback, checked by :func:`load_settings`).
    """
    argv = []
    if settings.app_hashes:
        argv = [sys.executable, "-m", "fedprog.deploy.pinned_supernode", "--site", str(settings.site)]
        argv += [arg for value in settings.app_hashes for arg in ("--app-hash", str(value).lower())]
        if settings.get("audit"):
            argv += ["--audit", str(Path(str(settings.audit)).resolve())]
        argv.append("--")
    argv += ["flower-supernode", "--superlink", str(settings.server)]
    if settings.get("ca"):
        argv += ["--root-certificates", str(Path(str(settings.ca)).resolve())]
    if settings.get("key"):
        argv += ["--auth-supernode-private-key", str(Path(str(settings.key)).resolve())]
    argv += ["--host", str(settings.runtime_host), "--port", str(int(settings.port))]
    argv += ["--node-config", node_config(settings)]
    if settings.process_model == "warm":
        argv += ["--isolation", "process"]
    if settings.get("max_retries") is not None:
        argv += ["--max-retries", str(int(settings.max_retries))]
    if settings.get("max_wait_time") is not None:
        argv += ["--max-wait-time", str(float(settings.max_wait_time))]
    argv += [str(arg) for arg in settings.get("extra_args") or []]
    return argv


def superexec_argv(settings: DictConfig, supernode_pid: int) -> list[str]:
    """Return the command of the warm fork-server SuperExec attached to the SuperNode's Runtime API."""
    argv = [
        sys.executable,
        "-m",
        "fedprog.deploy.site",
        "warm-superexec",
        "--runtime-api-address",
        f"{settings.runtime_host}:{int(settings.port)}",
        "--parent-pid",
        str(supernode_pid),
    ]
    for module in settings.get("warm_preload") or []:
        argv += ["--preload", str(module)]
    if settings.get("torch_threads"):
        argv += ["--torch-threads", str(int(settings.torch_threads))]
    return argv


def _audit(settings: DictConfig) -> AuditLog | None:
    return AuditLog(str(settings.audit)) if settings.get("audit") else None


def _check_files(settings: DictConfig) -> None:
    """One line naming the file: missing CA/key, a key readable by others, an unusable CA or key."""
    from fedprog.deploy.certs import check_ca_file, check_node_key

    where = f"site {settings.site}"
    for key in ("ca", "key"):
        value = settings.get(key)
        if value and not Path(str(value)).is_file():
            raise SiteConfigError(f"{where}: {key}={value} does not exist")
    if not settings.get("ca"):
        raise SiteConfigError(f"{where}: ca is not set (the consortium CA file, e.g. runs/certs/ca.crt)")
    if not settings.get("key"):
        raise SiteConfigError(f"{where}: key is not set (this site's node private key, nodes/<site>.key)")
    key_path = Path(str(settings.key))
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SiteConfigError(
            f"{where}: key file {key_path} is readable by group/others (mode {mode:o}); "
            f"run: chmod 600 {key_path}"
        )
    problems = check_ca_file(str(settings.ca)) + check_node_key(key_path, None)
    if problems:
        raise SiteConfigError(f"{where}: {problems[0]}")


def _check_app_pins(settings: DictConfig) -> None:
    if not settings.app_hashes and not settings.allow_any_app:
        raise SiteConfigError(
            f"site {settings.site}: app_hashes is empty: name the app (FAB SHA-256) the consortium pinned "
            "(`fedprog site fab-hash <app folder>`), or allow_any_app: true for a rehearsal"
        )


def check_superlink_certificate(settings: DictConfig) -> str:
    """Dial the SuperLink once with the site's CA; raise :class:`SiteConfigError` when TLS verification fails.

    Returns
    -------
    str
        ``"verified"``, or ``"unreachable"`` when nothing answers yet (the SuperNode then keeps retrying).
    """
    host, _, port = str(settings.server).rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(settings.ca))
    try:
        with socket.create_connection((host, int(port)), timeout=float(settings.tls_check_timeout_s)) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return "verified"
    except ssl.SSLCertVerificationError as error:
        raise SiteConfigError(
            f"site {settings.site}: the SuperLink at {settings.server} failed TLS verification with "
            f"ca={settings.ca} ({error.verify_message}): wrong CA file, or a server certificate without "
            f"{host!r}"
        ) from error
    except (OSError, ssl.SSLError) as error:
        logger.warning("site %s: SuperLink %s not reachable yet (%s)", settings.site, settings.server, error)
        return "unreachable"


def start_site(settings: DictConfig) -> list[ManagedProcess]:
    """Check the data, then start the SuperNode (and the warm SuperExec); return the started processes.

    Nothing is started when the data check fails (:class:`SiteDataError`) or a file is missing
    (:class:`SiteConfigError`). After starting, waits ``startup_grace_s`` seconds and raises
    :class:`ProcessError` (with the exit code; 305 = refused by the SuperLink) when the SuperNode exited.

    Returns
    -------
    list[ManagedProcess]
        ``[supernode]`` or ``[supernode, superexec]``.
    """
    _check_files(settings)
    _check_app_pins(settings)
    if settings.tls_check_timeout_s:
        check_superlink_certificate(settings)
    audit = _audit(settings)
    if settings.check_data:
        try:
            summary = check_site_data(settings)
        except SiteDataError as error:
            if audit is not None:
                audit.append("site_refused_bad_data", site=str(settings.site), reason=str(error))
            raise
        logger.info("site %s: data check passed (%s)", settings.site, type(summary).__name__)
    state = Path(str(settings.state_dir))
    state.mkdir(parents=True, exist_ok=True)
    env = flwr_env(str(settings.flwr_home))
    supernode = start_process(
        f"supernode-{settings.site}",
        supernode_argv(settings),
        env=env,
        log_path=state / SUPERNODE_LOG,
        pid_file=state / SUPERNODE_PID,
    )
    processes = [supernode]
    try:
        if settings.process_model == "warm":
            processes.append(
                start_process(
                    f"superexec-{settings.site}",
                    superexec_argv(settings, supernode.pid),
                    env={**env, TASK_POLL_ENV: str(float(settings.get("task_poll_s") or 1.0))},
                    log_path=state / SUPEREXEC_LOG,
                    pid_file=state / SUPEREXEC_PID,
                )
            )
        code = wait_for_exit(supernode, float(settings.startup_grace_s))
        if code is not None:
            flower_code = flower_exit_code(supernode.log_path)
            hint = ""
            if flower_code == EXIT_REFUSED:
                hint = (
                    f" (Flower exit code {EXIT_REFUSED}: refused by the SuperLink; check the CA, "
                    "the node key and its enrolment)"
                )
            raise ProcessError(
                f"supernode-{settings.site} exited with code {code}{hint}; log {supernode.log_path}:\n"
                f"{supernode.log_tail()}"
            )
    except ProcessError:
        for process in reversed(processes):
            stop_process(process, timeout=float(settings.stop_timeout_s))
        raise
    if audit is not None:
        audit.append(
            "supernode_started",
            site=str(settings.site),
            pid=supernode.pid,
            server=str(settings.server),
            process_model=str(settings.process_model),
            app_hashes=[str(h) for h in settings.app_hashes or []] or "any",
        )
    return processes


def stop_site(settings: DictConfig) -> bool:
    """Stop this site's SuperNode and SuperExec by their PID files; return False when none was running."""
    state = Path(str(settings.state_dir))
    pids = [
        pid for name in (SUPEREXEC_PID, SUPERNODE_PID) if (pid := read_pid_file(state / name)) is not None
    ]
    stopped = bool(pids)
    if pids:  # SIGTERM to both at once: the SuperNode deactivates its node, then both exit
        stop_processes(pids, timeout=float(settings.stop_timeout_s))
        logger.info("site %s: stopped PID(s) %s", settings.site, pids)
    for name in (SUPEREXEC_PID, SUPERNODE_PID):
        (state / name).unlink(missing_ok=True)
    audit = _audit(settings)
    if stopped and audit is not None:
        audit.append("supernode_stopped", site=str(settings.site))
    return stopped


# --------------------------------------------------------------------------------------------- CLI


def start_main(cfg: DictConfig) -> int:
    """``fedprog site start CONFIG``: check the data, start the SuperNode (``foreground=true`` waits).

    Returns
    -------
    int
        0 when started (or, in the foreground, the SuperNode's exit code); 1 when refused or failed.
    """
    try:
        settings = load_settings(cfg)
        processes = start_site(settings)
    except (SiteConfigError, SiteDataError, ProcessError) as error:
        print(f"fedprog site start: {error}")
        return 1
    supernode = processes[0]
    print(
        f"site {settings.site}: SuperNode connecting to {settings.server} (PID {supernode.pid}, "
        f"process model {settings.process_model}, log {supernode.log_path})"
    )
    if not settings.foreground:
        return 0
    try:
        code = wait_for_exit(supernode, timeout=float("inf")) or 0
    except KeyboardInterrupt:
        code = 0
    finally:
        for process in reversed(processes):
            stop_process(process, timeout=float(settings.stop_timeout_s))
    return int(code)


def stop_main(cfg: DictConfig) -> int:
    """``fedprog site stop CONFIG`` (needs a CLI entry): stop this site's processes by PID."""
    try:
        settings = load_settings(cfg)
    except SiteConfigError as error:
        print(f"fedprog site stop: {error}")
        return 1
    print(f"site {settings.site}: " + ("stopped" if stop_site(settings) else "nothing was running"))
    return 0


def fab_hash_main(cfg: DictConfig) -> int:
    """``fedprog site fab-hash [APP]``: print the FAB SHA-256 of the app folder (what ``app_hashes`` pins)."""
    print_fab_hash(str(cfg.app))
    return 0


def print_fab_hash(app_dir: str | Path) -> str:
    """Print and return the FAB SHA-256 ``fedprog server run`` submits for ``app_dir`` (what sites pin)."""
    import tempfile

    from fedprog.deploy.server import stage_app

    with tempfile.TemporaryDirectory() as folder:
        digest = str(stage_app(app_dir, Path(folder) / "app")["fab_sha256"])
    print(digest)
    return digest


# --------------------------------------------------------------------------------------------- warm SuperExec


def _warm_superexec(argv: Sequence[str]) -> None:
    """Run Flower's SuperExec loop with a fork-per-message executor after importing the app once."""
    parser = argparse.ArgumentParser(prog="python -m fedprog.deploy.site warm-superexec")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--preload", action="append", default=[])
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    started = time.monotonic()
    import importlib

    for module in args.preload:
        importlib.import_module(module)
    if args.torch_threads:  # inherited by every forked task (the evaluation path sets no thread count)
        import torch

        torch.set_num_threads(args.torch_threads)
    from flwr.supercore.superexec import run_superexec as flwr_superexec
    from flwr.supercore.superexec.executor.types import LaunchResult
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    logger.info("%s %s in %.1f s", WARM_READY, args.preload, time.monotonic() - started)

    class ForkExecutor:
        """Executor protocol of Flower's SuperExec: fork a warm child per ClientApp task."""

        def get_eligible_capacity(
            self, supported_task_types: set[Any], **_: Any
        ) -> tuple[set[Any], set[str]]:
            return supported_task_types, set()

        def wait_for_capacity(self, *_: Any, **__: Any) -> None:
            return None

        def launch(self, spec: Any) -> Any:
            pid = os.fork()
            if pid == 0:  # child: run one ClientApp task, never return into the parent's loop
                code = 0
                try:
                    run_clientapp(
                        runtime_api_address=spec.runtime_api_address,
                        token=spec.token,
                        insecure=spec.insecure,
                        certificates=None,
                        parent_pid=spec.parent_pid,
                        runtime_dependency_install=False,
                    )
                except SystemExit as exit_:
                    code = int(exit_.code or 0) if isinstance(exit_.code, int) else 1
                except Exception:  # noqa: BLE001 - the child reports and exits, never unwinds
                    logger.exception("warm ClientApp task failed")
                    code = 1
                finally:
                    os._exit(code)
            return LaunchResult.accepted()

        def reconcile(self) -> None:
            while True:  # reap finished children so they do not linger as zombies
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return

        def close(self) -> None:
            self.reconcile()

    flwr_superexec.get_executor = lambda *_, **__: ForkExecutor()  # type: ignore[assignment]
    flwr_superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fab-hash":  # the hash a site pins: print_fab_hash(folder)
        print_fab_hash(sys.argv[2] if len(sys.argv) > 2 else ".")
    elif len(sys.argv) > 1 and sys.argv[1] == "warm-superexec":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API poll otherwise
        _warm_superexec(sys.argv[2:])
    else:
        raise SystemExit(
            "usage: python -m fedprog.deploy.site fab-hash [APP_DIR] | warm-superexec ... "
            f"({shlex.join(sys.argv[1:])})"
        )
