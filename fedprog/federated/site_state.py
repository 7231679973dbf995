"""Optimizer moments a training site keeps between rounds, on its own disk (they never leave the site).

With ``training.keep_optimizer_state`` a site continues its optimizer (Adam moments, RAdam's step count) from
one round to the next. A site with a state folder writes them to ``<state dir>/<run id>/round-NNNN.npz`` after
each training round and reads the newest file before the round it trains, within a run and after a resume
alike (a new Flower run after a crash or a SuperLink restart): the resumed run then gives the same weights as
the uninterrupted one. A deployed site without a state folder keeps them in its node context only (in memory;
a resume restarts its moments).

The state folder is the site's own: in deployment the node config's ``state-dir`` (``fedprog site start``
passes ``<state_dir>/optimizer``); in ``fedprog simulate`` ``<out>/site_state/<site>``. Files are plain
``.npz`` arrays, read without pickle.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STATE_NODE_KEY = "state-dir"  # node config: the site's own folder for state kept between rounds
SIMULATION_SUBDIR = "site_state"
_ROUND_FILE = re.compile(r"round-(\d{4,})\.npz")


class SiteStateStore:
    """The optimizer states one site saved, one file per round, under ``folder/<run id>/``."""

    def __init__(self, folder: str | Path, run_id: str, keep: int = 0) -> None:
        from fedprog.report import safe_name

        self.folder = Path(folder) / safe_name(str(run_id))
        self.keep = int(keep)

    def save(self, server_round: int, state: Mapping[str, torch.Tensor]) -> Path:
        """Write the state after ``server_round`` (atomically) and prune to the newest ``keep`` (0: all)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"round-{server_round:04d}.npz"
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, **{key: value.detach().cpu().numpy() for key, value in state.items()})
        partial.replace(path)
        if self.keep > 0:
            for old in self.rounds()[: -self.keep]:
                (self.folder / f"round-{old:04d}.npz").unlink(missing_ok=True)
        return path

    def rounds(self) -> list[int]:
        """Rounds with a saved state, ascending."""
        if not self.folder.is_dir():
            return []
        found = (_ROUND_FILE.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def load_before(self, server_round: int) -> dict[str, torch.Tensor] | None:
        """The newest state saved in a round before ``server_round`` (None when there is none)."""
        earlier = [r for r in self.rounds() if r < server_round]
        if not earlier:
            return None
        path = self.folder / f"round-{earlier[-1]:04d}.npz"
        import torch

        with np.load(path, allow_pickle=False) as arrays:
            return {key: torch.from_numpy(arrays[key].copy()) for key in arrays.files}


def site_state_store(cfg: Any, node_config: Mapping[str, Any], site: str) -> SiteStateStore | None:
    """The site's store: node config ``state-dir`` (deployment), ``<out>/site_state/<site>`` (simulation).

    None for a deployed site without a ``state-dir`` (it keeps state in memory only; a resume then restarts
    its optimizer moments, logged as a warning when it happens).
    """
    run_id = cfg.get("run_id")
    if run_id is None:
        return None
    keep = int((cfg.get("checkpoint") or {}).get("keep", 0))
    if STATE_NODE_KEY in node_config:
        return SiteStateStore(Path(str(node_config[STATE_NODE_KEY])), str(run_id), keep)
    if "data-root" in node_config or cfg.get("out") is None:
        return None
    from fedprog.report import safe_name

    return SiteStateStore(Path(str(cfg.out)) / SIMULATION_SUBDIR / safe_name(site), str(run_id), keep)
