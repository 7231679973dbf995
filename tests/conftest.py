"""Shared pytest setup: offline Flower settings, the shared data folder, deterministic torch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDPROG_SHARED", REPO.parent / "shared")).resolve()

# Flower must never reach the network or install packages at run time during tests.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FEDPROG_SHARED", str(SHARED))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_flwr_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every test its own FLWR_HOME so no state leaks into ~/.flwr or between tests."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Drop the handlers a test's ``fedprog`` CLI call installed (they write to that test's closed stderr)."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder; tests using it are skipped cleanly when it is absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"shared data folder {data} is absent (set FEDPROG_SHARED)")
    return data
