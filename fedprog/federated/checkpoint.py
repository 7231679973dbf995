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
    run_id : str or None
        The run this checkpoint belongs to (a resume refuses a folder holding another run's checkpoints).
    """

    server_round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    federation: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None


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
            "run_id": checkpoint.run_id,
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


def checkpoint_run_id(folder: Path) -> str | None:
    """The run id stored in one round folder (None for a checkpoint written before run ids existed)."""
    try:
        return json.loads((folder / _STATE).read_text()).get("run_id")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder} is unreadable: {error}") from error


def find_checkpoint(path: str | Path) -> Path:
    """Resolve ``resume=PATH`` (a round folder, a checkpoints folder or a run's ``out``) to the newest round.

    Raises
    ------
    CheckpointError
        When no complete checkpoint is found there, or the folder holds checkpoints of several runs.
    """
    path = Path(path)
    if (path / _STATE).is_file():
        return path
    for root in (path, path / CHECKPOINT_DIR):
        rounds = list_checkpoints(root)
        if rounds:
            ids = sorted({str(checkpoint_run_id(r)) for r in rounds})
            if len(ids) > 1:
                raise CheckpointError(
                    f"resume={path}: the checkpoints there belong to {len(ids)} different runs "
                    f"({', '.join(ids)}); "
                    f"resume from one round folder (resume={rounds[-1]}) or remove the stale ones"
                )
            return rounds[-1]
    raise CheckpointError(f"resume={path}: no complete checkpoint (round-NNNN/{_STATE}) found there")


def run_folder(round_folder: Path) -> Path:
    """The run folder (``out``) that holds ``<out>/checkpoints/round-NNNN``."""
    return round_folder.resolve().parent.parent


def check_fresh_out(out: str | Path) -> Path:
    """Validate ``out`` for a new run: a writable folder without another run's checkpoints.

    Raises
    ------
    CheckpointError
        ``out`` is a file, not writable, or already holds checkpoints (a new run must never pick them up).
    """
    path = Path(out).resolve()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"out={out}: exists and is not a folder")
    rounds = list_checkpoints(path / CHECKPOINT_DIR)
    if rounds:
        raise CheckpointError(
            f"out={out} already holds checkpoints of run {checkpoint_run_id(rounds[-1])}; "
            f"continue it with resume={out} or choose a new out="
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise CheckpointError(f"out={out}: cannot write there ({error.strerror or error})") from error
    return path


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
        run_id=state.get("run_id"),
    )


#: Config keys (dotted prefixes) a resume may change: operational settings that leave the run's results as
#: they would have been. ``rounds`` may only grow. Every other changed key is refused.
RESUME_OVERRIDABLE = (
    "rounds",
    "out",
    "allow_partial",
    "round_timeout",
    "reply_poll_s",
    "reply_poll_max_s",
    "node_wait_timeout",
    "node_settle_s",
    "expected_sites",
    "min_train_sites",
    "eval_every",
    "checkpoint.",
    "simulation.",
    "audit.",
    "shared",
    "resume",
)


def _flat(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from fedprog.config import to_run_config

    return to_run_config(OmegaConf.create(dict(cfg)))


def _raw_value(container: Any, key: str) -> Any:
    """The value at dotted ``key`` of a plain container (None when absent)."""
    for part in key.split("."):
        if not isinstance(container, dict) or part not in container:
            return None
        container = container[part]
    return container


def _move_audit_log(cfg: Any, old_out: Path, new_out: Path) -> None:
    """An audit log that lived in the old run folder follows the run to the folder it now writes to."""
    audit = cfg.get("audit") or {}
    path = audit.get("path")
    if path and old_out.parts and Path(str(path)).is_relative_to(old_out):
        cfg.audit.path = str(new_out / Path(str(path)).relative_to(old_out))


def _allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_OVERRIDABLE)


def resume_config(cfg: Any, defaults: Any) -> tuple[Any, Checkpoint]:
    """The config of a resumed run: the checkpoint's config, the harmless overrides applied, ``out`` set.

    Parameters
    ----------
    cfg : DictConfig
        The composed config with ``resume`` set (and whatever the user overrode).
    defaults : DictConfig or None
        The same command's config without overrides: a key that differs from it was given by the user. None:
        take the checkpoint's config as it is (only ``out``/``resume`` are set).

    Returns
    -------
    (DictConfig, Checkpoint)
        ``out`` is the folder resumed from unless the user gave a new ``out=``; ``resume`` the absolute path.

    Raises
    ------
    CheckpointError
        An override that would change the run (one line naming the keys), ``rounds`` below the checkpoint's
        round, or a folder with several runs' checkpoints.
    """
    from omegaconf import OmegaConf

    folder = find_checkpoint(str(cfg.resume))
    checkpoint = load_checkpoint(folder)
    saved = OmegaConf.create(checkpoint.config)
    given = _flat(OmegaConf.to_container(cfg, resolve=True))
    base = _flat(OmegaConf.to_container(defaults, resolve=True)) if defaults is not None else given
    old = _flat(checkpoint.config)
    changed = {k: v for k, v in given.items() if base.get(k) != v and old.get(k) != v and k != "resume"}
    raw_given = OmegaConf.to_container(cfg, resolve=False)
    raw_base = OmegaConf.to_container(defaults, resolve=False) if defaults is not None else raw_given
    for key in list(changed):  # the same interpolation (a time-stamped default out) is not an override
        value = _raw_value(raw_given, key)
        if isinstance(value, str) and "${" in value and value == _raw_value(raw_base, key):
            changed.pop(key)
    if "out" in changed and Path(str(changed["out"])).resolve() == Path(str(saved.get("out", ""))).resolve():
        changed.pop("out")
    refused = sorted(k for k in changed if not _allowed(k))
    if refused:
        shown = ", ".join(f"{k}={changed[k]} (run has {old.get(k, 'nothing')})" for k in refused[:4])
        raise CheckpointError(
            f"resume={cfg.resume}: {shown} would change the resumed run; only "
            f"{', '.join(k.rstrip('.') for k in RESUME_OVERRIDABLE[:-2])} may be overridden "
            "(start a new run instead)"
        )
    for key, value in changed.items():
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
        log.info("resume: override %s=%s applied", key, value)
    if int(saved.rounds) < checkpoint.server_round:
        raise CheckpointError(
            f"rounds={saved.rounds} is below the {checkpoint.server_round} rounds already run"
        )
    saved.out = str(Path(str(cfg.out)).resolve()) if "out" in changed else str(run_folder(folder))
    _move_audit_log(saved, Path(str(checkpoint.config.get("out", ""))), Path(saved.out))
    if "out" in changed:
        check_fresh_out(saved.out)
    saved.resume = str(Path(str(cfg.resume)).resolve())  # resolves to ``folder`` (find_checkpoint)
    return saved, checkpoint
