"""Optimizer moments a training site keeps between rounds, on its own disk (they never leave the site).

With ``training.keep_optimizer_state`` a site continues its optimizer (Adam moments, RAdam's step count) from
one round to the next. A site with a state folder writes them to ``<state dir>/<run id>/round-NNNN.npz`` after
each training round and reads the newest file before the round it trains, within a run and after a resume
alike (a new Flower run after a crash or a SuperLink restart): the resumed run then gives the same weights as
the uninterrupted one. A deployed site without a state folder keeps them in its node context only (in memory;
a resume restarts its moments).

The state folder is the site's own: in deployment the node config's ``state-dir`` (``fedprog site start``
passes ``<state_dir>/optimizer``); in ``fedprog simulate`` ``<out>/site_state/<site>``. Files are plain
``.npz`` arrays, read without pickle: the tensors of one dtype packed into one buffer, beside a JSON
layout (name, dtype, shape, offset), because a file of one array per tensor (hundreds for an Adam state) costs
several times more to write and read on every training message (``simulations/message_cost.py``). Files of the
earlier one-array-per-tensor format are still read.
"""

from __future__ import annotations

import json
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
_LAYOUT = "__layout__"  # the packed format's JSON layout: [[name, dtype, shape, offset], ...]


def pack_state(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``state`` as one flat array per dtype (``packed_<dtype>``) and its layout (``__layout__``)."""
    buffers: dict[str, list[np.ndarray]] = {}
    layout, offsets = [], {}
    for name, tensor in state.items():
        array = tensor.detach().cpu().numpy()
        dtype = array.dtype.str
        layout.append([name, dtype, list(array.shape), offsets.get(dtype, 0)])
        offsets[dtype] = offsets.get(dtype, 0) + array.size
        buffers.setdefault(dtype, []).append(array.ravel())
    packed = {f"packed_{dtype}": np.concatenate(parts) for dtype, parts in buffers.items()}
    return {**packed, _LAYOUT: np.array(json.dumps(layout))}


def unpack_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The tensors of :func:`pack_state` (or of a file with one array per tensor, the earlier format)."""
    import torch

    if _LAYOUT not in arrays:
        return {key: torch.from_numpy(np.array(arrays[key])) for key in arrays}
    buffers: dict[str, np.ndarray] = {}
    out = {}
    for name, dtype, shape, offset in json.loads(str(arrays[_LAYOUT])):
        if dtype not in buffers:
            buffers[dtype] = np.array(arrays[f"packed_{dtype}"])  # one writable copy per dtype
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = torch.from_numpy(buffers[dtype][offset : offset + size].reshape(shape))
    return out


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
        np.savez(partial, **pack_state(state))
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
        with np.load(path, allow_pickle=False) as arrays:
            return unpack_state({key: arrays[key] for key in arrays.files})


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
