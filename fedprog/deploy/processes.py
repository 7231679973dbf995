"""Start, health-check, wait for and stop Flower processes by PID (each in its own process group).

Every process is started in a new session, so its process-group id equals its PID and :func:`stop_process`
can stop it *and* the children Flower spawns (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``)
without touching anything else. PID files record ``<pid> <command name>`` so a stale file whose PID was reused
by an unrelated program is recognised and never signalled.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FLWR_ENV_DEFAULTS: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
DEFAULT_STOP_TIMEOUT_S = 10.0
DEFAULT_POLL_S = 0.25
LOG_TAIL_LINES = 30
_EXIT_CODE = re.compile(r"Exit Code: (\d+)")


class ProcessError(RuntimeError):
    """A Flower process could not be started, did not become healthy, or exited; the message names it."""


@dataclass
class ManagedProcess:
    """A process started by :func:`start_process`.

    Attributes
    ----------
    name : str
        Human-readable name (``superlink``, ``supernode-blca``...), used in messages.
    pid : int
        Process id (= its process-group id).
    log_path : Path
        File receiving its stdout and stderr.
    pid_file : Path or None
        PID file written at start (removed by :func:`stop_process`).
    popen : subprocess.Popen or None
        Handle when started by this Python process (None when re-attached from a PID file).
    """

    name: str
    pid: int
    log_path: Path
    pid_file: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    def poll(self) -> int | None:
        """Return the exit code when the process has exited, else None."""
        if self.popen is not None:
            return self.popen.poll()
        return None if is_alive(self.pid) else -1

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the process log."""
        return log_tail(self.log_path, lines)


def flwr_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for every flwr process: ``FLWR_HOME`` plus the offline settings.

    Parameters
    ----------
    flwr_home : str or Path
        Flower's home folder (``config.toml``, installed apps); created.
    extra : Mapping[str, str], optional
        More variables (win over the defaults).

    Returns
    -------
    dict[str, str]
        A copy of ``os.environ`` (this interpreter's script folder first on ``PATH``) with ``FLWR_HOME``,
        ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and
        ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``.
    """
    home = Path(flwr_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)  # flower-superexec & co. sit beside this interpreter
    if scripts not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (scripts, env.get("PATH", "")) if p)
    env.update(FLWR_ENV_DEFAULTS)
    env["FLWR_HOME"] = str(home)
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (chosen by the OS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a text file ("" when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def flower_exit_code(log_path: str | Path) -> int | None:
    """Return the last Flower exit code logged (``Exit Code: 305``) in a process log, or None.

    Flower prints its own exit codes (305 = SuperNode refused by the SuperLink) but the process exit status is
    only 0/1, so the log is the place to read them from.
    """
    matches = _EXIT_CODE.findall(log_tail(log_path, lines=200))
    return int(matches[-1]) if matches else None


def is_alive(pid: int) -> bool:
    """Return True when a process with this PID exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: str | Path,
    pid_file: str | Path | None = None,
    cwd: str | Path | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session with stdout/stderr appended to ``log_path``; write ``pid_file``.

    Parameters
    ----------
    name : str
        Name used in messages and in the PID file.
    argv : Sequence[str]
        Command and arguments (no shell).
    env : Mapping[str, str]
        Full environment (see :func:`flwr_env`).
    log_path : str or Path
        Log file (parent folders created; appended to).
    pid_file : str or Path, optional
        Refused when it names a process that is still running.
    cwd : str or Path, optional
        Working directory.

    Returns
    -------
    ManagedProcess
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if pid_file is not None:
        pid_file = Path(pid_file)
        running = read_pid_file(pid_file)
        if running is not None:
            raise ProcessError(
                f"{name} already running with PID {running} (PID file {pid_file}); stop it first"
            )
        pid_file.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {name}: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            popen = subprocess.Popen(  # noqa: S603 - argv built by fedprog, no shell
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                cwd=None if cwd is None else str(cwd),
                start_new_session=True,
            )
        except FileNotFoundError as error:
            raise ProcessError(
                f"{name}: command {argv[0]!r} not found (is flwr installed in this env?)"
            ) from error
    if pid_file is not None:
        pid_file.write_text(f"{popen.pid} {Path(argv[0]).name}\n", encoding="utf-8")
    logger.info("started %s (PID %d), log %s", name, popen.pid, log_path)
    return ManagedProcess(name=name, pid=popen.pid, log_path=log_path, pid_file=pid_file, popen=popen)


def read_pid_file(pid_file: str | Path) -> int | None:
    """Return the PID recorded in ``pid_file`` when that process is alive and still runs the same command.

    A missing file, a dead process or a PID reused by another program returns None (and a stale file is
    removed).
    """
    pid_file = Path(pid_file)
    if not pid_file.is_file():
        return None
    fields = pid_file.read_text(encoding="utf-8").split()
    try:
        pid = int(fields[0])
    except (IndexError, ValueError):
        logger.warning("ignoring unreadable PID file %s", pid_file)
        return None
    command = fields[1] if len(fields) > 1 else ""
    # An empty command line is a process between fork and exec (just started): it is the one recorded.
    cmdline = _cmdline(pid) if command else ""
    if is_alive(pid) and (not command or not cmdline.strip() or command in cmdline):
        return pid
    logger.info("removing stale PID file %s (PID %d is not running %s)", pid_file, pid, command or "it")
    pid_file.unlink(missing_ok=True)
    return None


def stop_process(
    process: ManagedProcess | int, *, timeout: float = DEFAULT_STOP_TIMEOUT_S, name: str | None = None
) -> int | None:
    """Stop a process and its process group: SIGTERM, wait ``timeout`` seconds, then SIGKILL.

    Parameters
    ----------
    process : ManagedProcess or int
        What :func:`start_process` returned, or a PID that leads its own process group.
    timeout : float
        Seconds to wait after SIGTERM.
    name : str, optional
        Name for messages when a bare PID is given.

    Returns
    -------
    int or None
        Exit code when known (children of this Python process), else None.
    """
    managed = process if isinstance(process, ManagedProcess) else None
    pid = managed.pid if managed else int(process)  # type: ignore[arg-type]
    label = managed.name if managed else (name or f"PID {pid}")
    code: int | None = None
    # Flower starts its SuperExec in a session of its own, so the process group is not enough: stop every
    # descendant found now (by parent PID) as well as the group.
    targets = [pid, *_descendants(pid)] if is_alive(pid) else []
    if targets:
        _signal_all(targets, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _any_alive(targets):
            if managed and managed.popen is not None:
                managed.popen.poll()
            time.sleep(DEFAULT_POLL_S / 2)
        if _any_alive(targets):
            logger.warning("%s did not stop within %.0f s of SIGTERM; sending SIGKILL", label, timeout)
            _signal_all(targets, signal.SIGKILL)
    if managed and managed.popen is not None:
        try:
            code = managed.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.error("%s (PID %d) is still running after SIGKILL", label, pid)
    if managed and managed.pid_file is not None:
        managed.pid_file.unlink(missing_ok=True)
    logger.info("stopped %s (PID %d, exit code %s)", label, pid, code)
    return code


def stop_processes(
    running: Sequence[ManagedProcess | int], *, timeout: float = DEFAULT_STOP_TIMEOUT_S
) -> None:
    """Stop several processes (and their descendants) at once: SIGTERM to all, one shared wait, then SIGKILL.

    Stopping them one by one costs up to ``timeout`` seconds each; this costs it once (test teardowns, a site
    with a SuperNode and a SuperExec).

    Parameters
    ----------
    running : Sequence[ManagedProcess or int]
        What :func:`start_process` returned, or PIDs leading their own process group.
    timeout : float
        Seconds to wait after SIGTERM before SIGKILL.
    """
    managed = [p for p in running if isinstance(p, ManagedProcess)]
    pids = [p.pid if isinstance(p, ManagedProcess) else int(p) for p in running]
    targets = [t for pid in pids if is_alive(pid) for t in (pid, *_descendants(pid))]
    if targets:
        _signal_all(targets, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _any_alive(targets):
            for process in managed:
                if process.popen is not None:
                    process.popen.poll()
            time.sleep(DEFAULT_POLL_S / 2)
        if _any_alive(targets):
            logger.warning(
                "%d process(es) did not stop within %.0f s of SIGTERM; sending SIGKILL", len(pids), timeout
            )
            _signal_all(targets, signal.SIGKILL)
    for process in managed:
        stop_process(process, timeout=timeout)  # reaps the children and removes their PID files


def _descendants(pid: int) -> list[int]:
    """Return the PIDs of every live descendant of ``pid`` (children first), read from ``/proc``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for target in pids:
        _signal_group(target, sig)


def _any_alive(pids: list[int]) -> bool:
    return any(_group_alive(target) for target in pids)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid`` (or just ``pid`` when it leads no group)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return


def _group_alive(pid: int) -> bool:
    """Return True while the leader or any member of process group ``pid`` is alive (not a zombie)."""
    if is_alive(pid):
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pid) and fields[0] != "Z":
            return True
    return False


def wait_for_exit(process: ManagedProcess, timeout: float) -> int | None:
    """Wait up to ``timeout`` s for ``process`` to exit; return its exit code (None: still running)."""
    if process.popen is not None:
        try:
            return process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(process.pid):
            return -1
        time.sleep(DEFAULT_POLL_S)
    return None


def wait_for_health(
    process: ManagedProcess,
    url: str,
    *,
    ca_file: str | Path | None = None,
    timeout: float = 30.0,
    interval: float = DEFAULT_POLL_S,
) -> float:
    """Poll ``url`` (a ``/health`` endpoint) until it answers HTTP 200; fail fast when the process exits.

    Parameters
    ----------
    process : ManagedProcess
        The process serving ``url``.
    url : str
        ``http://`` or ``https://`` URL.
    ca_file : str or Path, optional
        CA certificate that must have signed the server certificate (``https``).
    timeout : float
        Seconds before giving up.
    interval : float
        Seconds between polls.

    Returns
    -------
    float
        Seconds until healthy.
    """
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    start = time.monotonic()
    last_error = "no answer yet"
    while time.monotonic() - start < timeout:
        code = process.poll()
        if code is not None:
            raise ProcessError(
                f"{process.name} exited with code {code} before becoming healthy; log {process.log_path}:\n"
                f"{process.log_tail()}"
            )
        try:
            request = urllib.request.Request(url)  # noqa: S310 - http(s) URL built by fedprog
            with urllib.request.urlopen(request, timeout=max(interval, 1.0), context=context) as response:
                if response.status == 200:
                    elapsed = time.monotonic() - start
                    logger.info("%s healthy at %s after %.1f s", process.name, url, elapsed)
                    return elapsed
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError) as error:
            last_error = str(getattr(error, "reason", error))
        time.sleep(interval)
    raise ProcessError(
        f"{process.name} did not answer {url} within {timeout:.0f} s ({last_error}); "
        f"log {process.log_path}:\n"
        f"{process.log_tail()}"
    )
