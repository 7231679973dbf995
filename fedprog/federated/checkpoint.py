"""Per-round checkpoints of a federated run (weights, server-optimizer state, RNG, config) and resume."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_ROUND_PREFIX = "round-"
_STATE = "state.json"  # written last: a round folder without it is incomplete and ignored
_WEIGHTS = "weights.npz"
_OPTIMIZER = "strategy.npz"
_CONFIG = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or inconsistent; the message names the path."""


@dataclass
class Checkpoint:
    """Everything a federated run needs to continue after round ``server_round``.

    Attributes
    ----------
    server_round : int
        The last completed round (0 = the initial model, before any training).
    arrays : dict of str to ndarray
        The global model weights after that round (state-dict order).
    strategy_state : dict of str to ndarray
        Server-optimizer state, e.g. FedAdam's ``m_t/<key>`` and ``v_t/<key>``; empty for FedAvg.
    rng : dict
        Python and NumPy global RNG states of the server process.
    config : dict
        The resolved run configuration.
    federation : dict
        Sites, roles, fitted bins and expression transform (the start-of-run query's outcome).
    history : list of dict
        Per-round records written so far (rows of rounds.csv and round summaries).
    """

    server_round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    federation: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def capture_rng() -> dict[str, Any]:
    """Return the Python and NumPy global RNG states as JSON-serialisable values."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned (missing entries are left alone)."""
    if "python" in rng:
        version, state, gauss = rng["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def round_dir(checkpoint_root: str | Path, server_round: int) -> Path:
    """The folder of one round's checkpoint: ``<root>/round-0003``."""
    return Path(checkpoint_root) / f"{_ROUND_PREFIX}{server_round:04d}"


def save_checkpoint(checkpoint_root: str | Path, checkpoint: Checkpoint, *, keep: int = 0) -> Path:
    """Write ``checkpoint`` atomically under ``checkpoint_root`` and prune old rounds.

    Parameters
    ----------
    checkpoint_root : path
        Usually ``<out>/checkpoints``; created when missing.
    checkpoint : Checkpoint
        What to save.
    keep : int
        Keep only the newest ``keep`` round folders (0 keeps all).

    Returns
    -------
    Path
        The round folder written.
    """
    import yaml  # PyYAML ships with hydra/omegaconf

    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    target = round_dir(root, checkpoint.server_round)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        np.savez(tmp / _WEIGHTS, **checkpoint.arrays)
        np.savez(tmp / _OPTIMIZER, **checkpoint.strategy_state)
        (tmp / _CONFIG).write_text(yaml.safe_dump(checkpoint.config, sort_keys=False))
        state = {
            "server_round": checkpoint.server_round,
            "array_order": list(checkpoint.arrays),
            "rng": checkpoint.rng,
            "federation": checkpoint.federation,
            "history": checkpoint.history,
        }
        (tmp / _STATE).write_text(json.dumps(state, allow_nan=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    log.debug("checkpoint of round %d written to %s", checkpoint.server_round, target)
    return target


def list_checkpoints(checkpoint_root: str | Path) -> list[Path]:
    """Complete round folders under ``checkpoint_root``, oldest first."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_ROUND_PREFIX) and (p / _STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_ROUND_PREFIX) :]))


def find_checkpoint(path: str | Path) -> Path:
    """Resolve ``resume=PATH`` (a round folder, a checkpoints folder or a run's ``out``) to the newest round.

    Raises
    ------
    CheckpointError
        When no complete checkpoint is found there.
    """
    path = Path(path)
    if (path / _STATE).is_file():
        return path
    for root in (path, path / CHECKPOINT_DIR):
        rounds = list_checkpoints(root)
        if rounds:
            return rounds[-1]
    raise CheckpointError(f"resume={path}: no complete checkpoint (round-NNNN/{_STATE}) found there")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load the checkpoint that :func:`find_checkpoint` selects for ``path``."""
    import yaml

    folder = find_checkpoint(path)
    try:
        state = json.loads((folder / _STATE).read_text())
        with np.load(folder / _WEIGHTS, allow_pickle=False) as weights:
            arrays = {key: weights[key] for key in state["array_order"]}
        with np.load(folder / _OPTIMIZER, allow_pickle=False) as optimizer:
            strategy_state = {key: optimizer[key] for key in optimizer.files}
        config = yaml.safe_load((folder / _CONFIG).read_text()) or {}
    except (OSError, KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {error}") from error
    return Checkpoint(
        server_round=int(state["server_round"]),
        arrays=arrays,
        strategy_state=strategy_state,
        rng=state.get("rng", {}),
        config=config,
        federation=state.get("federation", {}),
        history=state.get("history", []),
    )
