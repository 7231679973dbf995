"""Validated table parts cached in memory and on disk (NumPy ``.npz``), keyed by file content and spec.

Reading and validating a 1,500-gene ``rna.csv.gz`` takes seconds per cohort, in every process (each Flower
client); the validated result is stored once and re-read in a fraction of that. The key is a SHA-256 of the
file's resolved path, content hash (BLAKE2b of the bytes), size and modification time (ns) and the
:class:`~fedprog.data.layout.TablePart` spec, so an edited file or a changed spec is read again.
Cache folder: ``$FEDPROG_CACHE/tables`` (default ``~/.cache/fedprog/tables``); ``FEDPROG_CACHE=off``
disables the disk cache (the in-process cache stays). An unwritable folder or an unreadable entry only
costs a re-read (logged at DEBUG). Entries of edited files are never used again: delete the folder to
reclaim their space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from fedprog.data.layout import TablePart

log = logging.getLogger(__name__)

CACHE_ENV = "FEDPROG_CACHE"
CACHE_VERSION = 1
_MEMORY: dict[str, tuple[pd.DataFrame, list[tuple[str, str]]]] = {}
_MEMORY_LIMIT = 64  # entries kept in-process (a dozen cohorts x a few tables)


def cache_folder() -> Path | None:
    """The disk cache folder, or None when ``FEDPROG_CACHE=off``."""
    base = os.environ.get(CACHE_ENV, "")
    if base.lower() == "off":
        return None
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "fedprog"
    return root / "tables"


def part_key(path: Path, part: TablePart) -> str | None:
    """Cache key of one table part read from ``path`` (None when the file cannot be stat'ed)."""
    try:
        stat = path.stat()
        digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return None
    raw = {
        "version": CACHE_VERSION,
        "path": str(path.resolve()),
        "content": digest,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "part": asdict(part),
    }
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def load(key: str) -> tuple[pd.DataFrame, list[tuple[str, str]]] | None:
    """A cached (table, dropped) pair, or None."""
    if key in _MEMORY:
        table, dropped = _MEMORY[key]
        return table.copy(), list(dropped)
    folder = cache_folder()
    if folder is None or not (folder / f"{key}.npz").is_file():
        return None
    try:
        with np.load(folder / f"{key}.npz", allow_pickle=False) as data:
            result = _decode(data)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.debug("table cache entry %s unreadable (%s); reading the file again", key, exc)
        return None
    _remember(key, result)
    return result[0].copy(), list(result[1])


def save(key: str, table: pd.DataFrame, dropped: list[tuple[str, str]]) -> None:
    """Store a validated (table, dropped) pair in memory and, when possible, on disk."""
    _remember(key, (table.copy(), list(dropped)))
    folder = cache_folder()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **_encode(table, dropped))
        os.replace(tmp, folder / f"{key}.npz")
    except (OSError, ValueError) as exc:
        log.debug("table cache not written to %s (%s)", folder, exc)


def clear_memory() -> None:
    """Forget the in-process entries (tests)."""
    _MEMORY.clear()


def _remember(key: str, value: tuple[pd.DataFrame, list[tuple[str, str]]]) -> None:
    if len(_MEMORY) >= _MEMORY_LIMIT:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = value


def _strings(values: object) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=str)  # type: ignore[attr-defined]


def _encode(table: pd.DataFrame, dropped: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    numeric = [c for c, t in table.dtypes.items() if pd.api.types.is_float_dtype(t)]
    text = [c for c in table.columns if c not in set(numeric)]
    cats = table[text].astype(object)
    return {
        "index": _strings(table.index),
        "columns": _strings(table.columns),
        "numeric_columns": _strings(numeric),
        "numeric": table[numeric].to_numpy(dtype=np.float64),
        "text_columns": _strings(text),
        "text": cats.fillna("").to_numpy(dtype=str).reshape(len(table), len(text)),
        "text_missing": cats.isna().to_numpy(dtype=bool).reshape(len(table), len(text)),
        "dropped_cases": _strings(c for c, _ in dropped),
        "dropped_reasons": _strings(r for _, r in dropped),
    }


def _decode(data: np.lib.npyio.NpzFile) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    index = pd.Index(data["index"].astype(object), name="case_id")
    table = pd.DataFrame(data["numeric"], index=index, columns=[str(c) for c in data["numeric_columns"]])
    text = data["text"].astype(object)
    text[data["text_missing"]] = np.nan
    for i, col in enumerate(data["text_columns"]):
        table[str(col)] = text[:, i]
    table = table[[str(c) for c in data["columns"]]]
    dropped = list(zip(map(str, data["dropped_cases"]), map(str, data["dropped_reasons"]), strict=True))
    return table, dropped
