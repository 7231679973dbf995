"""The run folder of a command: ``runs/<command>/<YYYYmmdd-HHMMSS>/`` (or ``out=``), its config and versions.

Every run of ``fedprog simulate`` or ``fedprog train`` gets a fresh folder; two runs started in the same
second get ``<stamp>`` and ``<stamp>-2`` (the folder is claimed with an atomic ``mkdir``), so a second run
never overwrites the first. ``out=DIR`` names the folder explicitly (for scripts that resume or compare runs).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedprog.report import save_run_config, write_json

log = logging.getLogger(__name__)

RUNS_ROOT = Path("runs")
STAMP_FORMAT = "%Y%m%d-%H%M%S"
VERSIONS_FILE = "versions.json"
RESULTS_FILE = "results.json"
#: Version of results.json's layout; raised when a key is renamed or removed (adding keys keeps it).
RESULTS_SCHEMA_VERSION = 1


def claim_new_folder(parent: Path, name: str) -> Path:
    """Create and return ``parent/name``, or ``name-2``, ``name-3``... when taken (never an existing one)."""
    parent.mkdir(parents=True, exist_ok=True)
    candidate, suffix = parent / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = parent / f"{name}-{suffix}"


def run_folder(
    command: str, out: str | Path | None, *, now: dt.datetime | None = None, runs_root: Path = RUNS_ROOT
) -> Path:
    """The absolute run folder of one run: ``out`` when given (created), else a new time-stamped one.

    Parameters
    ----------
    command : str
        Command name (``simulate``, ``train``): the default parent is ``runs_root/<command>``.
    out : str, Path or None
        The ``out=`` setting; ``None`` gives ``runs_root/<command>/<YYYYmmdd-HHMMSS>[-N]``.
    now : datetime, optional
        Time stamp (default: the current local time).
    """
    if out is not None:
        folder = Path(str(out))
        folder.mkdir(parents=True, exist_ok=True)
    else:
        stamp = (now or dt.datetime.now()).strftime(STAMP_FORMAT)
        folder = claim_new_folder(runs_root / command, stamp)
    folder = folder.resolve()
    log.info("run folder %s", folder)
    return folder


def save_versions(folder: Path) -> Path:
    """Write the package versions and machine facts to ``<folder>/versions.json``."""
    from fedprog.report import environment_info

    path = folder / VERSIONS_FILE
    path.write_text(json.dumps(environment_info(), indent=2) + "\n", encoding="utf-8")
    return path


def start_run(command: str, cfg: DictConfig) -> Path:
    """Claim the run folder of ``cfg.out``, set ``cfg.out`` to it and save the config and versions there."""
    folder = run_folder(command, cfg.out)
    cfg.out = str(folder)
    save_run_config(cfg, folder)
    save_versions(folder)
    return folder


def write_results(out: Path, command: str, results: dict[str, Any]) -> Path:
    """Write ``<out>/results.json`` with its schema stamp (``schema``: name, version, command) first."""
    stamp = {"name": "fedprog.results", "version": RESULTS_SCHEMA_VERSION, "command": command}
    return write_json({"schema": stamp, **results}, Path(out) / RESULTS_FILE)
