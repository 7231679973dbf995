"""Coordinating server: ``fedprog server start|enrol|run|stop server/server.yaml`` (``flower-superlink``).

One config file (``server/server.yaml``, merged over the defaults of ``configs/server.yaml``) says where the
SuperLink listens, which TLS files it uses, where its persistent state database lives, which sites are
enrolled (name -> OpenSSH public key), the run-config of the run, and where the report goes. Relative paths
are relative to the working directory (the repository root).

- ``start``: Flower's SuperLink with TLS, ``--enable-supernode-auth``, ``--database``,
  ``--disable-runtime-dependency-installation``, behind :mod:`fedprog.deploy.gate`: the hospitals' address
  (``address:port``) serves only the Fleet API; the Control and Runtime (ServerAppIo) APIs listen on
  ``control_host:control_port`` (loopback only). The CA, certificate and key are checked first (one line
  naming the file). PID file ``<state_dir>/superlink.pid``; waits for ``/health`` on both sockets.
- ``enrol``: ``flwr supernode register <pub> <connection>`` for every enrolled site (idempotent), over the
  loopback Control API: ``enrol`` and ``run`` are run on the coordinator itself.
- ``run``: ``flwr run <app> <connection> --run-config <toml> --stream``; follows the run to its end, then
  lists the report the ServerApp wrote to its ``out`` folder and adds the "rounds missed per site" table
  (from ``rounds.csv``) to it. ``resume=auto`` continues from the newest checkpoint in ``out`` (after a
  SuperLink restart). With ``stage_app: true`` (default) the app is first snapshotted to
  ``<state_dir>/app`` with Flower's FAB file rules (:func:`stage_app`), so ``flwr run`` never walks the
  repository's ``.venv`` or ``runs/`` and tolerates ``fab-exclude`` patterns that match nothing.
- ``stop``: stops the SuperLink (and the processes it spawned) by its PID.

Every step is recorded in the audit log (:class:`fedprog.audit.AuditLog`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedprog.audit import AuditLog
from fedprog.deploy.processes import (
    ManagedProcess,
    ProcessError,
    flwr_env,
    read_pid_file,
    start_process,
    stop_process,
    wait_for_health,
)

logger = logging.getLogger(__name__)

PID_FILE = "superlink.pid"
LOG_FILE = "superlink.log"
RUN_LOG_FILE = "run.log"
REPORT_FILES = ("results.json", "report.md")
CHECKPOINT_STATE_GLOB = "checkpoints/round-*/state.json"
ROUNDS_FILE = "rounds.csv"
MISSING_ROUNDS_FILE = "missing_rounds.csv"
STAGED_APP_DIR = "app"
MISSING_ROUNDS_MARKER = "<!-- fedprog.deploy.server: rounds missed per site -->"
MISSING_ROUNDS_TITLE = "Rounds missed per site"
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")


class ServerConfigError(ValueError):
    """The server config is incomplete or names a file that does not exist; the message names the key/file."""


class EnrolError(RuntimeError):
    """``flwr supernode register`` failed for a site; the message names the site and key file."""


# --------------------------------------------------------------------------------------------- config


def load_settings(cfg: DictConfig) -> DictConfig:
    """Merge the server config file ``cfg.config`` over the defaults of ``configs/server.yaml``.

    Parameters
    ----------
    cfg : DictConfig
        Composed ``configs/server.yaml``; ``cfg.config`` is the path of the server's config file (or null to
        use the defaults alone).

    Returns
    -------
    DictConfig
        Resolved settings (``config`` removed).
    """
    defaults = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "config"])
    path = cfg.get("config")
    if path:
        path = Path(str(path))
        if not path.is_file():
            raise ServerConfigError(f"server config file {path} does not exist")
        settings = OmegaConf.merge(defaults, OmegaConf.load(path))
    else:
        settings = defaults
    OmegaConf.resolve(settings)
    for key in (
        "address",
        "port",
        "control_host",
        "control_port",
        "certs",
        "database",
        "flwr_home",
        "state_dir",
        "connection",
    ):
        if OmegaConf.is_missing(settings, key) or settings.get(key) in (None, ""):
            raise ServerConfigError(f"server config {path or '(defaults)'}: key {key!r} is not set")
    return settings  # type: ignore[return-value]


def _check_files(settings: DictConfig, keys: tuple[str, ...]) -> None:
    missing = [
        f"certs.{key}={settings.certs[key]}" for key in keys if not Path(str(settings.certs[key])).is_file()
    ]
    if missing:
        raise ServerConfigError(
            f"server: TLS file(s) not found: {', '.join(missing)} (make them with `fedprog certs`)"
        )


def superlink_url(settings: DictConfig) -> str:
    """Return the ``host:port`` SuperNodes and the CLI dial (``public_host`` must be a certificate SAN)."""
    return f"{settings.public_host}:{int(settings.port)}"


def control_url(settings: DictConfig) -> str:
    """Return the loopback ``host:port`` of the Control API (``flwr run``, ``flwr supernode register``)."""
    return f"{settings.control_host}:{int(settings.control_port)}"


def write_connection(settings: DictConfig) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one TLS connection to the loopback Control API (the default).

    Returns
    -------
    Path
        The ``config.toml`` written.
    """
    home = Path(str(settings.flwr_home)).resolve()
    home.mkdir(parents=True, exist_ok=True)
    name = str(settings.connection)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ServerConfigError(f"server: connection name {name!r} must be letters, digits, '-' or '_'")
    ca = Path(str(settings.certs.ca)).resolve()
    text = (
        "# written by fedprog.deploy.server (fedprog server ...)\n"
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "{control_url(settings)}"\nroot-certificates = "{ca}"\n'
    )
    path = home / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _env(settings: DictConfig) -> dict[str, str]:
    return flwr_env(str(settings.flwr_home))


def _state_dir(settings: DictConfig) -> Path:
    path = Path(str(settings.state_dir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _audit(settings: DictConfig) -> AuditLog | None:
    return AuditLog(str(settings.audit)) if settings.get("audit") else None


def _record(settings: DictConfig, event: str, **fields: Any) -> None:
    audit = _audit(settings)
    if audit is not None:
        audit.append(event, **fields)


def _fingerprint(public_key_path: Path) -> str:
    """SHA-256 of the OpenSSH public key blob (the base64 field), like ``ssh-keygen -l -E sha256``, as hex."""
    fields = public_key_path.read_text(encoding="utf-8").split()
    blob = fields[1] if len(fields) > 1 else public_key_path.read_text(encoding="utf-8")
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------- start / stop


def superlink_argv(settings: DictConfig) -> list[str]:
    """Return the SuperLink command line: Flower's SuperLink behind :mod:`fedprog.deploy.gate`.

    Flower's ``--host/--port`` (every API: Control, Runtime/ServerAppIo, Fleet) is
    ``control_host:control_port`` on loopback; ``address:port`` serves only the Fleet API and ``/health``
    (TLS, node authentication, persistent state either way).
    """
    _check_control_plane(settings)
    argv = [
        sys.executable,
        "-m",
        "fedprog.deploy.gate",
        "--public-host",
        str(settings.address),
        "--public-port",
        str(int(settings.port)),
        "--",
        "--ssl-ca-certfile",
        str(Path(str(settings.certs.ca)).resolve()),
        "--ssl-certfile",
        str(Path(str(settings.certs.cert)).resolve()),
        "--ssl-keyfile",
        str(Path(str(settings.certs.key)).resolve()),
        "--host",
        str(settings.control_host),
        "--port",
        str(int(settings.control_port)),
        "--database",
        str(Path(str(settings.database)).resolve()),
        "--disable-runtime-dependency-installation",
    ]
    if settings.get("node_auth", True):
        argv.append("--enable-supernode-auth")
    argv += [str(arg) for arg in settings.get("extra_args") or []]
    return argv


def _check_control_plane(settings: DictConfig) -> None:
    """Refuse a Control API host that is not loopback, or one port for both listeners."""
    from fedprog.deploy.gate import is_loopback

    if not is_loopback(str(settings.control_host)):
        raise ServerConfigError(
            f"server config: control_host={settings.control_host!r} must be a loopback address (127.0.0.1): "
            "the Control API has no authentication and must never face the hospitals"
        )
    if int(settings.control_port) == int(settings.port):
        raise ServerConfigError(
            f"server config: control_port={settings.control_port} must differ from the Fleet "
            f"port={settings.port}"
        )


def _check_tls_files(settings: DictConfig) -> None:
    """One line naming the file when the server's CA/certificate/key do not fit together or miss a host."""
    from fedprog.deploy.certs import check_server_files

    hosts = [str(settings.public_host), str(settings.control_host)]
    problems = check_server_files(settings.certs.ca, settings.certs.cert, settings.certs.key, hosts)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ServerConfigError(f"server TLS: {problems[0]}{more}")


def start_superlink(settings: DictConfig) -> ManagedProcess:
    """Start the SuperLink, write its PID file and wait until ``https://<public_host>:<port>/health`` answers.

    Parameters
    ----------
    settings : DictConfig
        From :func:`load_settings`.

    Returns
    -------
    ManagedProcess
        The running SuperLink (stop it with :func:`stop_superlink` or ``fedprog server stop``).
    """
    _check_files(settings, ("ca", "cert", "key"))
    _check_tls_files(settings)
    state = _state_dir(settings)
    Path(str(settings.database)).parent.mkdir(parents=True, exist_ok=True)
    write_connection(settings)
    process = start_process(
        "superlink",
        superlink_argv(settings),
        env=_env(settings),
        log_path=state / LOG_FILE,
        pid_file=state / PID_FILE,
    )
    try:
        elapsed = wait_for_health(
            process,
            f"https://{superlink_url(settings)}/health",
            ca_file=str(settings.certs.ca),
            timeout=float(settings.health_timeout_s),
        )
        wait_for_health(
            process,
            f"https://{control_url(settings)}/health",
            ca_file=str(settings.certs.ca),
            timeout=float(settings.health_timeout_s),
        )
    except ProcessError:
        stop_process(process, timeout=float(settings.stop_timeout_s))
        raise
    _record(
        settings,
        "superlink_started",
        pid=process.pid,
        address=superlink_url(settings),
        control=control_url(settings),
        ready_s=round(elapsed, 2),
    )
    return process


def stop_superlink(settings: DictConfig) -> bool:
    """Stop the SuperLink recorded in ``<state_dir>/superlink.pid``; return False when none was running."""
    pid_file = Path(str(settings.state_dir)) / PID_FILE
    pid = read_pid_file(pid_file)
    if pid is None:
        logger.info("no SuperLink running (PID file %s)", pid_file)
        return False
    stop_process(pid, timeout=float(settings.stop_timeout_s), name="superlink")
    pid_file.unlink(missing_ok=True)
    _record(settings, "superlink_stopped", pid=pid)
    return True


# --------------------------------------------------------------------------------------------- enrol


def _flwr(settings: DictConfig, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        ["flwr", *args],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def enrol_sites(settings: DictConfig) -> dict[str, str]:
    """Register every enrolled site's public key with the running SuperLink.

    The ``flwr supernode register`` calls run ``enrol_workers`` at a time (each spends ~2 s importing the
    CLI); their outcomes are checked and audited in the config's site order.

    Returns
    -------
    dict[str, str]
        Site name -> outcome (``"registered"`` or ``"already registered"``).
    """
    from concurrent.futures import ThreadPoolExecutor

    sites: Mapping[str, Any] = settings.get("sites") or {}
    if not sites:
        raise ServerConfigError("server config: no `sites` to enrol (site name -> public key file)")
    keys = {str(site): Path(str(public_key)) for site, public_key in sites.items()}
    for site, key_path in keys.items():
        if not key_path.is_file():
            raise EnrolError(f"site {site!r}: public key {key_path} does not exist")
    write_connection(settings)

    def register(site: str) -> subprocess.CompletedProcess[str]:
        return _flwr(
            settings,
            ["supernode", "register", str(keys[site].resolve()), str(settings.connection), "--name", site],
            timeout=float(settings.cli_timeout_s),
        )

    with ThreadPoolExecutor(max_workers=max(1, int(settings.get("enrol_workers") or 1))) as pool:
        results = dict(zip(keys, pool.map(register, keys), strict=True))
    outcome: dict[str, str] = {}
    for site, result in results.items():
        text = (result.stdout + result.stderr).strip()
        if result.returncode == 0:
            outcome[site] = "registered"
        elif "already" in text.lower():
            outcome[site] = "already registered"
        else:
            raise EnrolError(
                f"site {site!r}: `flwr supernode register {keys[site]}` failed ({result.returncode}): {text}"
            )
        logger.info("site %s: %s (%s)", site, outcome[site], keys[site])
        _record(
            settings,
            "supernode_enrolled",
            site=site,
            key_sha256=_fingerprint(keys[site]),
            outcome=outcome[site],
        )
    return outcome


# --------------------------------------------------------------------------------------------- run


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def find_resume_point(out: str | Path) -> Path | None:
    """Return ``out`` when it holds a complete round checkpoint (``checkpoints/round-*/state.json``)."""
    out = Path(out)
    return out if any(out.glob(CHECKPOINT_STATE_GLOB)) else None


def run_config(settings: DictConfig) -> dict[str, bool | int | float | str]:
    """Return the run-config overrides for ``flwr run``.

    With ``run.config_name`` set (the fedprog apps), the run's full config is composed here -
    ``configs/<config_name>.yaml`` + ``run.overrides`` + ``out=<out>`` (+ ``resume=<point>``) -, resolved,
    saved as ``<state_dir>/run_config.yaml`` and passed as the single key ``run_keys.config_file``; the
    ServerApp reads it and sends the clients what they need. With ``run.config_name: null`` (any other Flower
    app) the keys named by ``run_keys.out`` / ``run_keys.resume`` carry the report folder and the resume
    point. ``run_config`` adds raw keys either way. ``resume: auto`` resumes from ``out`` when it holds a
    checkpoint.
    """
    raw = settings.get("run_config")
    values: dict[str, Any] = {}
    if raw is not None:
        values = dict(OmegaConf.to_container(raw, resolve=True))  # type: ignore[arg-type]
    keys = settings.run_keys
    out = str(Path(str(settings.out)).resolve())
    resume = settings.get("resume")
    if resume == "auto":
        point = find_resume_point(out)
        resume = None if point is None else str(point)
        logger.info("resume=auto: %s", f"resuming from {resume}" if resume else "no checkpoint, fresh run")
    resume = str(Path(str(resume)).resolve()) if resume else None
    if settings.run.get("config_name"):
        from fedprog.config import load_config, to_container
        from fedprog.federated.errors import SettingsError
        from fedprog.federated.settings import check_run_settings

        overrides = [str(item) for item in settings.run.get("overrides") or []]
        overrides.append(f"out={out}")
        if resume:
            overrides.append(f"resume={resume}")
        composed = OmegaConf.create(to_container(load_config(str(settings.run.config_name), overrides)))
        if "strategy" in composed:  # a federation's config (simulate-like): checked before the run starts
            try:
                check_run_settings(composed)
            except SettingsError as error:
                raise ServerConfigError(str(error)) from None
        user_choice = any(item.lstrip("+~").startswith("audit.enabled") for item in overrides)
        if settings.run_audit and "audit" in composed and not user_choice:
            composed.audit.enabled = True  # every deployment round is audited unless the operator says not
        if "audit" in composed and composed.audit.enabled and not composed.audit.get("path"):
            composed.audit.path = str(Path(out) / "audit.jsonl")  # beside the report it is anchored in
        path = _state_dir(settings) / "run_config.yaml"
        OmegaConf.save(composed, path)
        values[str(keys.config_file)] = str(path.resolve())
    else:
        if keys.get("out"):
            values[str(keys.out)] = out
        if resume and keys.get("resume"):
            values[str(keys.resume)] = resume
    for key, value in values.items():
        if value is None or isinstance(value, list | dict):
            raise ServerConfigError(
                f"server config: run_config[{key!r}] = {value!r}; Flower run-config values must be "
                f"bool, int, "
                f"float or str (use fedprog.config.to_run_config for structured values)"
            )
    return values


class AppStagingError(ServerConfigError):
    """The Flower app cannot be snapshotted into a FAB-sized folder; the message names the file or rule."""


def _app_file_rules(app_dir: Path) -> tuple[dict[str, Any], Any, Any]:
    """Return the app's pyproject, its user include spec and its user exclude spec (None when absent)."""
    import tomllib

    from flwr.cli.utils import build_pathspec

    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise AppStagingError(f"app_dir={app_dir} has no pyproject.toml (not a Flower app)")
    config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    include = app.get("fab-include")
    exclude = app.get("fab-exclude")
    return (
        config,
        build_pathspec(include) if include else None,
        build_pathspec(exclude) if exclude else None,
    )


def _walk_app(app_dir: Path, ignore: Any) -> list[str]:
    """Relative POSIX paths of the app's files, never entering hidden or ``.gitignore``-d folders."""
    found: list[str] = []
    for folder, subdirs, files in os.walk(app_dir, followlinks=False):
        rel = Path(folder).relative_to(app_dir)
        subdirs[:] = [
            name
            for name in subdirs
            if not name.startswith(".")
            and name != "__pycache__"
            and not ignore.match_file(f"{(rel / name).as_posix()}/")
        ]
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                found.append((rel / name).as_posix())
    return found


def stage_app(app_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Snapshot a Flower app into ``dest`` with the files Flower would put in its FAB; return a summary.

    The file rules are Flower 1.42's (``flwr build``): the root ``.gitignore``, the app's ``fab-include`` /
    ``fab-exclude`` and Flower's built-in include (``*.py *.toml *.md *.yaml *.yml *.json *.jsonl LICENSE``)
    and exclude lists. Two differences make it usable on a repository root: hidden and ``.gitignore``-d
    folders (``.venv``, ``runs``...) are never walked (``flwr run .`` walks all ~50k files of a ``.venv``),
    and a ``fab-exclude`` pattern that matches nothing is logged instead of refused (plain ``flwr run``
    refuses it).
    The snapshot's ``pyproject.toml`` is the app's own minus ``fab-include``/``fab-exclude`` (they have been
    applied). ``dest`` is replaced.

    Parameters
    ----------
    app_dir : str or Path
        Folder whose ``pyproject.toml`` has ``[tool.flwr.app]`` (e.g. the repository root).
    dest : str or Path
        Snapshot folder (e.g. ``<state_dir>/app``).

    Returns
    -------
    dict
        ``files`` (int), ``bytes`` (int, uncompressed), ``fab_bytes`` (int, size of the FAB Flower builds
        from ``dest``), ``fab_sha256`` (str) and ``unmatched_patterns`` (list[str]).

    Raises
    ------
    AppStagingError
        No pyproject, or the FAB would exceed Flower's size limit (the largest files are named).
    """
    with warnings.catch_warnings():  # pathspec deprecates the 'gitwildmatch' style Flower 1.42 builds on
        warnings.simplefilter("ignore", DeprecationWarning)
        return _stage_app(Path(app_dir).resolve(), Path(dest).resolve())


def _stage_app(app_dir: Path, dest: Path) -> dict[str, Any]:
    import shutil

    import tomli_w
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.common.constant import FAB_EXCLUDE_PATTERNS, FAB_INCLUDE_PATTERNS, FAB_MAX_SIZE

    config, include, exclude = _app_file_rules(app_dir)
    gitignore = app_dir / ".gitignore"
    ignore = build_pathspec(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""))
    paths = [p for p in _walk_app(app_dir, ignore) if not ignore.match_file(p)]
    unmatched = []
    for key, spec in (("fab-include", include), ("fab-exclude", exclude)):
        if spec is None:
            continue
        for pattern in config["tool"]["flwr"]["app"][key]:
            if not any(build_pathspec([pattern]).match_file(p) for p in paths):
                unmatched.append(f"{key}: {pattern}")
    if unmatched:
        logger.warning(
            "%s/pyproject.toml: pattern(s) %s match no file; plain `flwr run %s` refuses such patterns",
            app_dir,
            unmatched,
            app_dir,
        )
    built_in_include = build_pathspec(FAB_INCLUDE_PATTERNS)
    built_in_exclude = build_pathspec(FAB_EXCLUDE_PATTERNS)
    chosen = sorted(
        p
        for p in paths
        if (include is None or include.match_file(p))
        and (exclude is None or not exclude.match_file(p))
        and built_in_include.match_file(p)
        and not built_in_exclude.match_file(p)
    )
    if dest.exists():
        shutil.rmtree(dest)
    sizes = {}
    for rel in chosen:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(app_dir / rel, target)
        sizes[rel] = target.stat().st_size
    app = config["tool"]["flwr"]["app"]
    for key in ("fab-include", "fab-exclude"):
        app.pop(key, None)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    try:
        fab = build_fab_from_disk(dest)
    except ValueError as error:
        largest = sorted(sizes, key=sizes.__getitem__, reverse=True)[:5]
        raise AppStagingError(
            f"app {app_dir}: Flower cannot build a FAB from its {len(chosen)} file(s) "
            f"({sum(sizes.values())} bytes; largest {largest}): {error}"
        ) from error
    summary = {
        "files": len(chosen),
        "bytes": int(sum(sizes.values())),
        "fab_bytes": len(fab),
        "fab_sha256": hashlib.sha256(fab).hexdigest(),
        "unmatched_patterns": unmatched,
    }
    logger.info(
        "staged app %s -> %s: %d files, FAB %.0f kB (limit %.0f kB)",
        app_dir,
        dest,
        summary["files"],
        summary["fab_bytes"] / 1024,
        FAB_MAX_SIZE / 1024,
    )
    return summary


def start_run(settings: DictConfig) -> int:
    """Submit the run with ``flwr run ... --stream``, follow it to the end and list the report.

    Returns
    -------
    int
        Exit code of ``flwr run`` (0 = the run finished).
    """
    write_connection(settings)
    state = _state_dir(settings)
    values = run_config(settings)
    _check_app_keys(Path(str(settings.app_dir)), values)
    toml_path = state / "run_config.toml"
    toml_path.write_text(
        "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in values.items()), encoding="utf-8"
    )
    app_dir = Path(str(settings.app_dir)).resolve()
    run_dir, staged = app_dir, None
    if settings.get("stage_app", True):
        run_dir = state / STAGED_APP_DIR
        staged = stage_app(app_dir, run_dir)
    argv = ["flwr", "run", str(run_dir), str(settings.connection), "--run-config", str(toml_path), "--stream"]
    _record(settings, "run_submitted", app_dir=str(app_dir), run_config=values, staged=staged)
    started = time.monotonic()
    log_path = state / RUN_LOG_FILE
    with log_path.open("a", encoding="utf-8") as log:
        process = subprocess.Popen(  # noqa: S603
            argv, env=_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        flower_codes: list[
            int
        ] = []  # `flwr run --stream` exits 0 even when the ServerApp fails: read its log
        try:
            for line in process.stdout:
                match = _EXIT_CODE.search(line)
                if match:
                    flower_codes.append(int(match.group(1)))
                log.write(line)
                if settings.get("echo", True):
                    sys.stdout.write(line)
            code = process.wait(timeout=float(settings.run_timeout_s))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
            logger.error("flwr run exceeded run_timeout_s=%s and was killed", settings.run_timeout_s)
    elapsed = time.monotonic() - started
    if code == 0 and any(flower_codes):
        code = next(value for value in flower_codes if value)
        logger.error("the run failed with Flower exit code %d (ServerApp error); see %s", code, log_path)
    report = collect_report(settings.out)
    _record(
        settings,
        "run_finished",
        exit_code=code,
        wall_s=round(elapsed, 1),
        report=report,
        run_audit=run_audit_anchor(settings.out),
    )
    if code != 0:
        logger.error("flwr run exited with %d after %.0f s; see %s", code, elapsed, log_path)
    return code


def run_audit_anchor(out: str | Path) -> dict[str, Any] | None:
    """Return the anchor of the ServerApp's ``<out>/audit.jsonl`` (None when absent; ``error`` when broken).

    The launcher stores it in its own log: a later truncation or rewrite of the run's log is then caught by
    ``fedprog audit verify <out>/audit.jsonl expect_hash=... expect_entries=...``.
    """
    from fedprog.audit import AuditError, audit_anchor

    path = Path(out) / "audit.jsonl"
    if not path.is_file():
        return None
    try:
        return audit_anchor(path)
    except AuditError as error:
        logger.error("%s", error)
        return {"error": str(error)}


def _check_app_keys(app_dir: Path, values: Mapping[str, Any]) -> None:
    """Fail early, naming the key, when a run-config key is not declared in the app's pyproject."""
    import tomllib

    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ServerConfigError(f"server config: app_dir={app_dir} has no pyproject.toml (not a Flower app)")
    declared = (
        tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("flwr", {}).get("app", {})
    )
    flat = _flatten(declared.get("config", {}))
    unknown = sorted(set(values) - set(flat))
    if unknown:
        raise ServerConfigError(
            f"run-config key(s) {unknown} are not declared in [tool.flwr.app.config] of {pyproject}; "
            f"Flower refuses undeclared keys (declared: {sorted(flat)})"
        )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def _round_list(rounds: Any) -> str:
    return " ".join(str(int(r)) for r in sorted(rounds)) or "-"


def missing_rounds(out: str | Path) -> Any:
    """Return the rounds each site missed, from the ServerApp's ``rounds.csv`` and ``results.json``.

    A site *missed* an evaluation round when ``rounds.csv`` (one row per evaluated round and site) has rows
    for that round but none for the site - it was disconnected or did not answer in time. A training site
    *missed* a training round when it is not among that round's accepted updates in ``results.json``
    (``rounds[i].accepted``); rejected updates are listed in the report's "Updates left out" table.

    Parameters
    ----------
    out : str or Path
        The run's report folder.

    Returns
    -------
    pandas.DataFrame or None
        One row per site: ``site`` (str), ``role`` (str), ``missed_eval_rounds`` / ``missed_train_rounds``
        (str, space-separated round numbers, ``-`` for none; training is ``n/a`` for held-out sites) and
        ``n_missed_eval`` (int). None when ``out`` holds no ``rounds.csv`` with ``round`` and ``site``
        columns.
    """
    import pandas as pd

    out = Path(out)
    path = out / ROUNDS_FILE
    if not path.is_file():
        return None
    try:
        rows = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        logger.warning("%s is not readable as a table (%s); no missed-rounds table", path, error)
        return None
    if not {"round", "site"} <= set(rows.columns):
        return None
    results: dict[str, Any] = {}
    if (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    roles = {str(s["site"]): str(s.get("role", "?")) for s in results.get("sites", []) if "site" in s}
    if "role" in rows.columns:
        for site, role in zip(rows["site"], rows["role"], strict=True):
            roles.setdefault(str(site), str(role))
    evaluated = set(int(r) for r in rows["round"].unique())
    trained = {int(r["round"]): set(r.get("accepted", [])) for r in results.get("rounds", []) if "round" in r}
    table = []
    for site in sorted(roles):
        seen = set(int(r) for r in rows.loc[rows["site"].astype(str) == site, "round"])
        missed_train = (
            "n/a"
            if roles[site] == "holdout" or not trained
            else _round_list(r for r, accepted in trained.items() if site not in accepted)
        )
        table.append(
            {
                "site": site,
                "role": roles[site],
                "missed_eval_rounds": _round_list(evaluated - seen),
                "missed_train_rounds": missed_train,
                "n_missed_eval": len(evaluated - seen),
            }
        )
    return pd.DataFrame(
        table, columns=["site", "role", "missed_eval_rounds", "missed_train_rounds", "n_missed_eval"]
    )


def _add_missing_rounds(out: Path) -> None:
    """Write ``missing_rounds.csv`` and (re)write the "Rounds missed per site" section of ``report.md``."""
    from fedprog.report import markdown_table

    table = missing_rounds(out)
    if table is None:
        return
    table.to_csv(out / MISSING_ROUNDS_FILE, index=False)
    report = out / "report.md"
    if not report.is_file():
        return
    text = report.read_text(encoding="utf-8").split(MISSING_ROUNDS_MARKER)[0].rstrip()
    if f"## {MISSING_ROUNDS_TITLE}" in text:  # the ServerApp's report already has the table
        return
    missed = (table["n_missed_eval"] > 0) | ~table["missed_train_rounds"].isin(["-", "n/a"])
    sentence = (
        "Rounds in which a site sent no evaluation (disconnected or too slow: its rows are absent from "
        "rounds.csv) or no accepted model update."
        if missed.any()
        else "Every site answered every evaluated round and every training round."
    )
    section = (
        f"\n\n{MISSING_ROUNDS_MARKER}\n## {MISSING_ROUNDS_TITLE}\n\n{sentence}\n\n"
        f"{markdown_table(table.drop(columns=['n_missed_eval']))}\n"
    )
    report.write_text(text + section, encoding="utf-8")


def collect_report(out: str | Path) -> dict[str, str]:
    """Add the missed-rounds table to the report in ``out``; return ``{file: sha256}`` of the report files.

    Parameters
    ----------
    out : str or Path
        The run's report folder (the ServerApp's ``out``).

    Returns
    -------
    dict[str, str]
        SHA-256 of each of ``results.json``, ``report.md`` and ``missing_rounds.csv`` found (empty if none).
    """
    out = Path(out)
    _add_missing_rounds(out)
    found = {}
    for name in (*REPORT_FILES, MISSING_ROUNDS_FILE):
        path = out / name
        if path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --------------------------------------------------------------------------------------------- CLI


def _guarded(action: str, cfg: DictConfig, function: Any) -> int:
    try:
        settings = load_settings(cfg)
        return int(function(settings) or 0)
    except (ServerConfigError, EnrolError, ProcessError) as error:
        print(f"fedprog server {action}: {error}")
        return 1


def start_main(cfg: DictConfig) -> int:
    """``fedprog server start server/server.yaml``: start the SuperLink in the background, wait for health."""

    def action(settings: DictConfig) -> int:
        process = start_superlink(settings)
        print(
            f"SuperLink running: Fleet API for the hospitals at {superlink_url(settings)}, Control API at "
            f"{control_url(settings)} (this machine only) (PID {process.pid}, log {process.log_path})"
        )
        return 0

    return _guarded("start", cfg, action)


def enrol_main(cfg: DictConfig) -> int:
    """``fedprog server enrol server/server.yaml``: register every site's public key."""

    def action(settings: DictConfig) -> int:
        for site, outcome in enrol_sites(settings).items():
            print(f"{site}: {outcome}")
        return 0

    return _guarded("enrol", cfg, action)


def run_main(cfg: DictConfig) -> int:
    """``fedprog server run server/server.yaml``: start the run, follow it, print where the report is."""

    def action(settings: DictConfig) -> int:
        code = start_run(settings)
        report = collect_report(settings.out)
        if report:
            print(f"report in {settings.out}: {', '.join(report)}")
        else:
            print(f"no report found in {settings.out}")
        return code

    return _guarded("run", cfg, action)


def stop_main(cfg: DictConfig) -> int:
    """``fedprog server stop server/server.yaml``: stop the SuperLink by its PID."""

    def action(settings: DictConfig) -> int:
        print("SuperLink stopped" if stop_superlink(settings) else "no SuperLink was running")
        return 0

    return _guarded("stop", cfg, action)
