from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from fedprog.audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    audit_anchor,
    canonical_json,
    entry_hash,
    sha256_arrays,
    verify,
    verify_main,
)
from fedprog.config import load_config


def _write_log(path: Path, n: int = 5) -> list[dict]:
    log = AuditLog(path)
    return [log.append("round_finished", round=i, site=f"s{i % 2}", loss=0.5 / (i + 1)) for i in range(n)]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_chain_links_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    entries = _write_log(path)
    assert [e["seq"] for e in entries] == list(range(5))
    assert entries[0]["prev_hash"] == GENESIS_HASH
    for before, after in zip(entries, entries[1:], strict=False):
        assert after["prev_hash"] == before["hash"]
    assert all(entry_hash(e) == e["hash"] for e in entries)
    on_disk = [json.loads(line) for line in _lines(path)]
    assert on_disk == entries
    result = verify(path)
    assert result.ok and result.n_entries == 5 and result.first_bad is None
    assert result.last_hash == entries[-1]["hash"]


def test_resumes_existing_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = _write_log(path, 3)
    resumed = AuditLog(path).append("run_resumed", run_id=7)
    assert resumed["seq"] == 3 and resumed["prev_hash"] == first[-1]["hash"]
    assert verify(path).ok


def test_tampered_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["loss"] = 0.0
    lines[2] = json.dumps(entry) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    result = verify(path)
    assert not result.ok and result.first_bad == 3
    assert "modified" in result.reason


def test_deleted_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    del lines[1]
    path.write_text("".join(lines), encoding="utf-8")
    result = verify(path)
    assert not result.ok and result.first_bad == 2
    assert "prev_hash" in result.reason


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    lines = _lines(path)
    lines[3], lines[4] = lines[4], lines[3]
    path.write_text("".join(lines), encoding="utf-8")
    result = verify(path)
    assert not result.ok and result.first_bad == 4


def test_garbage_line_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 2)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    result = verify(path)
    assert not result.ok and result.first_bad == 3 and "JSON" in result.reason
    with pytest.raises(AuditError, match="cannot resume the chain"):
        AuditLog(path).append("more")
    missing = verify(tmp_path / "nope.jsonl")
    assert not missing.ok and "does not exist" in missing.reason


def test_reserved_and_unserialisable_fields_refused(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError, match="reserved"):
        log.append("x", hash="forged")
    with pytest.raises(AuditError, match="not JSON-serialisable"):
        log.append("x", value=object())
    assert not (tmp_path / "audit.jsonl").exists() or verify(tmp_path / "audit.jsonl").ok


def _append_many(path: str, tag: str, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.append("concurrent", writer=tag, i=i)


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), tag, 25)) for tag in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    result = verify(path)
    assert result.ok and result.n_entries == 50


def test_sha256_arrays_formats_agree() -> None:
    rng = np.random.default_rng(0)
    weights = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, dtype=np.float32)}
    as_torch = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in weights.items()}
    assert sha256_arrays(weights) == sha256_arrays(as_torch)
    assert sha256_arrays(list(weights.values())) == sha256_arrays(
        [np.asfortranarray(v) for v in weights.values()]
    )
    changed = dict(weights, b=np.full(4, 1e-7, dtype=np.float32))
    assert sha256_arrays(changed) != sha256_arrays(weights)
    assert sha256_arrays({"w": weights["w"].astype(np.float64)}) != sha256_arrays({"w": weights["w"]})
    assert sha256_arrays({"w": weights["w"].reshape(4, 3)}) != sha256_arrays({"w": weights["w"]})


def test_sha256_arrays_accepts_flower_arrayrecord() -> None:
    from flwr.app import ArrayRecord

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    assert sha256_arrays(ArrayRecord(state)) == sha256_arrays(state)


def test_verify_main_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    assert verify_main(load_config("audit", [f"path={path}"])) == 0
    assert "OK, 3 entries" in capsys.readouterr().out
    lines = _lines(path)
    path.write_text(lines[0] + lines[2], encoding="utf-8")
    assert verify_main(load_config("audit", [f"path={path}"])) == 1
    assert "BROKEN at line 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------ anchors (issue 8, finding 8)


def test_empty_log_never_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("", encoding="utf-8")
    result = verify(path)
    assert not result.ok and result.first_bad == 0 and "empty" in result.reason
    with pytest.raises(AuditError, match="empty"):
        audit_anchor(path)


def test_truncated_log_fails_against_its_anchor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Deleting the last lines leaves a valid chain, which only the anchor (hash + count) exposes."""
    path = tmp_path / "audit.jsonl"
    _write_log(path, 5)
    anchor = audit_anchor(path)
    assert anchor == {"last_hash": verify(path).last_hash, "entries": 5}
    path.write_text("".join(_lines(path)[:3]), encoding="utf-8")
    assert verify(path).ok  # the chain alone cannot tell
    by_count = verify(path, expect_hash=anchor["last_hash"], expect_entries=anchor["entries"])
    assert not by_count.ok and "2 entr(y/ies) were deleted at the end" in by_count.reason
    by_hash = verify(path, expect_hash=anchor["last_hash"])
    assert not by_hash.ok and "not in the chain" in by_hash.reason
    cfg = load_config("audit", [f"path={path}", f"expect_hash={anchor['last_hash']}", "expect_entries=5"])
    assert verify_main(cfg) == 1 and "deleted at the end" in capsys.readouterr().out


def test_rewritten_chain_fails_against_its_anchor(tmp_path: Path) -> None:
    """An entry is edited and every hash after it recomputed: the chain verifies, the anchor does not."""
    path = tmp_path / "audit.jsonl"
    _write_log(path, 4)
    anchor = audit_anchor(path)
    entries = [json.loads(line) for line in _lines(path)]
    entries[1]["site"] = "forged"
    prev = GENESIS_HASH
    for entry in entries:
        entry["prev_hash"] = prev
        entry["hash"] = prev = entry_hash(entry)
    path.write_text("".join(canonical_json(e) + "\n" for e in entries), encoding="utf-8")
    assert verify(path).ok
    result = verify(path, expect_hash=anchor["last_hash"], expect_entries=anchor["entries"])
    assert not result.ok and "rewritten" in result.reason


def test_entries_after_the_anchor_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.jsonl"
    _write_log(path, 3)
    anchor = audit_anchor(path)
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "audit": anchor}))
    AuditLog(path).append("run_finished", status="completed")
    assert verify(path, expect_hash=anchor["last_hash"], expect_entries=anchor["entries"]).ok
    assert verify_main(load_config("audit", [f"path={path}", f"expect={tmp_path}"])) == 0
    assert "matches its anchor" in capsys.readouterr().out
    path.write_text("".join(_lines(path)[:2]), encoding="utf-8")
    assert verify_main(load_config("audit", [f"path={path}", f"expect={tmp_path / 'results.json'}"])) == 1
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed"}))
    assert verify_main(load_config("audit", [f"path={path}", f"expect={tmp_path}"])) == 2
    assert "no audit anchor" in capsys.readouterr().out
