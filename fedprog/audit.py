"""Append-only, hash-chained JSON-lines audit trail (who joined, which model went where, with which hash).

Flower's own audit logging is an Enterprise feature, so fedprog keeps its own. Every entry is one JSON line::

    {"seq": 0, "time": "2026-11-02T10:00:00.123456+00:00", "event": "run_started", ...fields,
     "prev_hash": "000...0", "hash": "<sha256>"}

``hash`` is the SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of the entry *without* ``hash``;
``prev_hash`` is the ``hash`` of the previous entry (64 zeros for the first). Changing, deleting, inserting or
reordering any line therefore breaks the chain at that line, and :func:`verify` names the first broken line.

Limits (stated plainly): a chain alone cannot show that lines were cut off *at the end*, nor a whole file
rewritten with recomputed hashes. Both are caught against an *anchor* (:func:`audit_anchor`: the last
``hash`` and the entry count) recorded elsewhere - ``results.json`` (key ``audit``), the launcher's own log -
with ``fedprog audit verify LOG expect_hash=H [expect_entries=N]`` or ``expect=results.json``. An anchor
stored in a file the attacker can also rewrite proves nothing; keep a copy off the machine. An empty log
never verifies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
RESERVED_FIELDS = frozenset({"seq", "time", "event", "prev_hash", "hash"})
_TAIL_CHUNK = 65536  # bytes read from the end of the file at a time when looking for the last entry


class AuditError(ValueError):
    """An audit log cannot be appended to (unreadable last entry, reserved field name, non-JSON value)."""


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes
    ----------
    ok : bool
        True when every line parses and the chain is intact.
    n_entries : int
        Number of non-empty lines read.
    first_bad : int or None
        1-based line number of the first broken entry (None when ``ok``).
    reason : str
        Why that line is broken ("" when ``ok``).
    last_hash : str
        Hash of the last valid entry before ``first_bad`` (the chain head when ``ok``).
    """

    ok: bool
    n_entries: int
    first_bad: int | None
    reason: str
    last_hash: str = GENESIS_HASH


def _json_default(value: Any) -> Any:
    """Make numpy scalars/arrays, paths and sets JSON-serialisable (anything else is an error)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"audit field value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def canonical_json(entry: Mapping[str, Any]) -> str:
    """Return the canonical JSON text of ``entry``: sorted keys, no whitespace, UTF-8, NaN allowed.

    Parameters
    ----------
    entry : Mapping[str, Any]
        JSON-serialisable mapping (numpy scalars and paths are converted).

    Returns
    -------
    str
        The text that is hashed and written.
    """
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of the canonical JSON of ``entry`` without its ``hash`` key."""
    body = {key: value for key, value in entry.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _last_line(handle: Any) -> bytes | None:
    """Return the last non-empty line of a binary file opened for reading (None when the file is empty)."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    buffer = b""
    position = end
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        handle.seek(position)
        buffer = handle.read(step) + buffer
        stripped = buffer.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    stripped = buffer.rstrip(b"\n")
    return stripped or None


class AuditLog:
    """Append-only audit log with a SHA-256 hash chain; resumes the chain of an existing file.

    Appends hold an exclusive ``flock`` on the file and re-read its last entry, so several processes (the
    ServerApp, the launcher) can write to one log without forking the chain. Each line is flushed and
    ``fsync``-ed before :meth:`append` returns.

    Parameters
    ----------
    path : str or Path
        The ``.jsonl`` file; created (with its parent folders) on the first append.

    Examples
    --------
    >>> log = AuditLog(tmp / "audit.jsonl")                       # doctest: +SKIP
    >>> log.append("model_sent", round=1, site="brca", sha256=sha256_arrays(arrays))  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def head(self) -> tuple[int, str]:
        """Return ``(next_seq, prev_hash)`` from the file's last entry (``(0, GENESIS_HASH)`` if none)."""
        if not self.path.exists():
            return 0, GENESIS_HASH
        with self.path.open("rb") as handle:
            return self._head_of(handle)

    def _head_of(self, handle: Any) -> tuple[int, str]:
        line = _last_line(handle)
        if line is None:
            return 0, GENESIS_HASH
        try:
            last = json.loads(line.decode("utf-8"))
            return int(last["seq"]) + 1, str(last["hash"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise AuditError(
                f"audit log {self.path}: cannot resume the chain, last line is not a valid entry ({error}); "
                f"run `fedprog audit verify {self.path}`"
            ) from error

    def anchor(self) -> dict[str, Any]:
        """The log's anchor now (:func:`audit_anchor`): store it away from the log, e.g. in results.json."""
        return audit_anchor(self.path)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; return the entry written (with ``seq``, ``time``, ``prev_hash``, ``hash``).

        Parameters
        ----------
        event : str
            Event name, e.g. ``"supernode_enrolled"``, ``"model_sent"``, ``"run_finished"``.
        **fields : Any
            JSON-serialisable details (site, round, sha256, node_id, ...). Names in
            :data:`RESERVED_FIELDS` are refused.

        Returns
        -------
        dict
            The entry as written.
        """
        clash = RESERVED_FIELDS.intersection(fields)
        if clash:
            raise AuditError(f"audit event {event!r}: field name(s) {sorted(clash)} are reserved")
        if not event:
            raise AuditError(f"audit log {self.path}: event name must be a non-empty string")
        try:  # refuse a bad value before the file is touched (a failed first append leaves no empty log)
            canonical_json(fields)
        except (TypeError, ValueError) as error:
            raise AuditError(f"audit event {event!r}: {error}") from error
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                seq, prev_hash = self._head_of(handle)
                entry: dict[str, Any] = {
                    "seq": seq,
                    "time": datetime.now(UTC).isoformat(),
                    "event": event,
                    **fields,
                    "prev_hash": prev_hash,
                }
                try:
                    entry["hash"] = entry_hash(entry)
                    line = json.dumps(entry, ensure_ascii=False, default=_json_default)  # readable order
                except TypeError as error:
                    raise AuditError(f"audit event {event!r}: {error}") from error
                handle.seek(0, os.SEEK_END)
                handle.write(line.encode("utf-8") + b"\n")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        logger.debug("audit %s #%d %s", self.path, seq, event)
        return entry


def verify(
    path: str | Path, *, expect_hash: str | None = None, expect_entries: int | None = None
) -> VerifyResult:
    """Check the hash chain of an audit log, and optionally that it still holds an anchored head.

    Parameters
    ----------
    path : str or Path
        The ``.jsonl`` audit log.
    expect_hash : str, optional
        An anchored ``last_hash`` (:func:`audit_anchor`): the chain must contain an entry with this hash -
        at index ``expect_entries - 1`` when that is given. Entries appended after the anchor are accepted.
    expect_entries : int, optional
        The anchored entry count; the log must hold at least this many entries.

    Returns
    -------
    VerifyResult
        ``first_bad`` is the 1-based line number of the first line that does not parse, has a wrong ``seq``,
        a ``prev_hash`` that is not the previous line's hash, or a ``hash`` that does not match its content.
        A missing or empty file is broken at line 0; a log that lost or rewrote its anchored head is broken
        at the line after its last entry.
    """
    path = Path(path)
    if not path.is_file():
        return VerifyResult(False, 0, 0, f"audit log {path} does not exist")
    prev_hash = GENESIS_HASH
    n_entries = 0
    hashes: list[str] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                return VerifyResult(False, n_entries, number, "empty line inside the log", prev_hash)
            n_entries += 1
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                return VerifyResult(False, n_entries, number, f"not valid JSON ({error})", prev_hash)
            reason = _entry_problem(entry, expected_seq=n_entries - 1, prev_hash=prev_hash)
            if reason:
                return VerifyResult(False, n_entries, number, reason, prev_hash)
            prev_hash = entry["hash"]
            hashes.append(prev_hash)
    if n_entries == 0:
        return VerifyResult(False, 0, 0, f"audit log {path} is empty (an audit log always has entries)")
    reason = _anchor_problem(hashes, expect_hash, expect_entries)
    if reason:
        return VerifyResult(False, n_entries, n_entries + 1, reason, prev_hash)
    return VerifyResult(True, n_entries, None, "", prev_hash)


def _anchor_problem(hashes: list[str], expect_hash: str | None, expect_entries: int | None) -> str:
    """Return why a valid chain does not match its anchor ("" when it does or when there is none)."""
    n = len(hashes)
    if expect_entries is not None and n < int(expect_entries):
        return (
            f"the log holds {n} entries but its anchor recorded {int(expect_entries)}: "
            f"{int(expect_entries) - n} entr(y/ies) were deleted at the end"
        )
    if expect_hash is None:
        return ""
    expect_hash = str(expect_hash).lower()
    if expect_entries is not None:
        if hashes[int(expect_entries) - 1] != expect_hash:
            return (
                f"entry {int(expect_entries)} has hash {hashes[int(expect_entries) - 1][:12]}..., its anchor "
                f"says {expect_hash[:12]}...: the chain was rewritten (hashes recomputed)"
            )
        return ""
    if expect_hash not in hashes:
        return (
            f"the anchored hash {expect_hash[:12]}... is not in the chain (head {hashes[-1][:12]}...): "
            "entries were deleted at the end or the chain was rewritten"
        )
    return ""


def audit_anchor(path: str | Path) -> dict[str, Any]:
    """Return the anchor of an intact audit log: ``{"last_hash": str, "entries": int}``.

    Store it where the log's writer cannot silently rewrite it together with the log (``results.json``
    under ``audit``, the report, the launcher's own log); :func:`verify` with ``expect_hash`` /
    ``expect_entries`` then detects truncation and rewriting.

    Raises
    ------
    AuditError
        The log is missing, empty or broken (the message names the line).
    """
    result = verify(path)
    if not result.ok:
        raise AuditError(
            f"audit log {path}: cannot anchor, broken at line {result.first_bad}: {result.reason}"
        )
    return {"last_hash": result.last_hash, "entries": result.n_entries}


def _entry_problem(entry: Any, *, expected_seq: int, prev_hash: str) -> str:
    """Return why ``entry`` breaks the chain ("" when it is fine)."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, not a JSON object"
    missing = sorted(RESERVED_FIELDS - entry.keys())
    if missing:
        return f"missing field(s) {missing}"
    if entry["prev_hash"] != prev_hash:
        return (
            f"prev_hash {str(entry['prev_hash'])[:12]}... does not match the previous entry's hash "
            f"{prev_hash[:12]}... (a line before it was deleted, inserted or moved)"
        )
    if entry["seq"] != expected_seq:
        return f"seq is {entry['seq']!r}, expected {expected_seq}"
    if entry_hash(entry) != entry["hash"]:
        return "hash does not match the entry's content (the line was modified)"
    return ""


def sha256_arrays(arrays: Mapping[str, Any] | Iterable[Any]) -> str:
    """Return one SHA-256 over a list or mapping of arrays (model weights), independent of memory layout.

    Parameters
    ----------
    arrays : Mapping[str, array-like] or Iterable[array-like]
        A torch state dict, a Flower ``ArrayRecord`` (values with ``.numpy()``), a dict of numpy arrays or a
        list of numpy arrays / tensors. Mapping keys are hashed in their given order together with the values.

    Returns
    -------
    str
        Hex digest over, for each array in order: its name (mappings only), dtype, shape and C-order bytes.
        NaN payloads are hashed as stored (no normalisation).
    """
    digest = hashlib.sha256()
    items = arrays.items() if isinstance(arrays, Mapping) else ((None, value) for value in arrays)
    for name, value in items:
        array = np.ascontiguousarray(_to_numpy(value))
        if name is not None:
            digest.update(b"name:" + str(name).encode("utf-8") + b"\0")
        digest.update(f"{array.dtype.str}:{array.shape}".encode() + b"\0")
        digest.update(array.tobytes())
    return digest.hexdigest()


def _to_numpy(value: Any) -> np.ndarray:
    """Convert a torch tensor, a Flower ``Array`` or any array-like to a numpy array."""
    if hasattr(value, "detach"):  # torch.Tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy") and callable(value.numpy):  # flwr.app.Array
        return np.asarray(value.numpy())
    return np.asarray(value)


def read_anchor(expect: str | Path) -> dict[str, Any]:
    """Read the anchor ``{"last_hash", "entries"}`` from a ``results.json`` (key ``audit``) or its folder."""
    path = Path(expect)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise AuditError(f"anchor file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        anchor = data["audit"]
        return {"last_hash": str(anchor["last_hash"]), "entries": int(anchor["entries"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise AuditError(
            f"{path}: no audit anchor (key 'audit' with 'last_hash' and 'entries'): {error}"
        ) from error


def verify_main(cfg: DictConfig) -> int:
    """``fedprog audit verify PATH [expect_hash=H] [expect_entries=N] [expect=results.json]``.

    Parameters
    ----------
    cfg : DictConfig
        Composed ``configs/audit.yaml``; ``cfg.path`` is the log to verify; ``expect_hash`` /
        ``expect_entries`` or ``expect`` (a ``results.json`` or run folder) give the anchor.

    Returns
    -------
    int
        0 when the chain is intact (and matches its anchor), 1 otherwise, 2 on a usage error.
    """
    if cfg.get("path") in (None, "", "???"):
        print("fedprog audit verify: give the log to check, e.g. `fedprog audit verify runs/audit.jsonl`")
        return 2
    expect_hash, expect_entries = cfg.expect_hash, cfg.expect_entries
    if cfg.expect:
        try:
            anchor = read_anchor(str(cfg.expect))
        except AuditError as error:
            print(f"fedprog audit verify: {error}")
            return 2
        expect_hash, expect_entries = anchor["last_hash"], anchor["entries"]
    result = verify(
        str(cfg.path),
        expect_hash=None if expect_hash is None else str(expect_hash),
        expect_entries=None if expect_entries is None else int(expect_entries),
    )
    anchored = " (matches its anchor)" if expect_hash or expect_entries else " (no anchor given)"
    if result.ok:
        print(f"audit log {cfg.path}: OK, {result.n_entries} entries, head {result.last_hash}{anchored}")
        return 0
    print(
        f"audit log {cfg.path}: BROKEN at line {result.first_bad} "
        f"({result.n_entries} entries read): {result.reason}"
    )
    return 1
