"""Federated style sharing: only aggregates travel, within site limits, pooled leave-one-out, one key off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fed_helpers import DirectGrid, tiny_config
from flwr.app import ConfigRecord, Message

from fedprog.federated import client_app
from fedprog.federated.disclosure import DisclosurePolicy
from fedprog.federated.messages import (
    STYLE_BANK_KEY,
    STYLE_FIELDS,
    STYLE_KEY,
    STYLE_MODALITIES,
    ReplyError,
    check_style_record,
)
from fedprog.federated.server_app import run_federation
from fedprog.federated.simulation import prepare
from fedprog.federated.style_sharing import record_to_summaries, site_style_record
from fedprog.models.cade import CADE, pool_style_summaries

DIM = 16  # model.dim of tiny_config
WIDTHS = {"strong": DIM, "weak": DIM}
HELDOUT_PARTITION = 2  # c1-B1


class RecordingGrid(DirectGrid):
    """A DirectGrid that also keeps every (message, reply) pair it carried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[Message, Message]] = []

    def answer(self, msg: Message) -> Message:
        reply = super().answer(msg)
        self.log.append((msg, reply))
        return reply

    def trains(self, server_round: int) -> list[tuple[str, Message, Message]]:
        """(site, message, reply) of one round's train messages."""
        return [
            (_site(self, m), m, r)
            for m, r in self.log
            if m.metadata.message_type.startswith("train")
            and m.content["config"]["server-round"] == server_round
        ]


def _site(grid: DirectGrid, msg: Message) -> str:
    return ["c0-A1", "c0-A2", "c1-B1", "c1-B2"][grid.node_ids.index(msg.metadata.dst_node_id)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("style") / "synth"
    prepare(tiny_config(root, root.parent / "unused"))
    return root


def _run(data_root: Path, out: Path, *overrides: str, faults=None) -> tuple[dict, RecordingGrid]:
    client_app.clear_caches()
    cfg = prepare(tiny_config(data_root, out, "modules=cade", "audit.enabled=true", *overrides))
    grid = RecordingGrid(int(cfg.expected_sites), faults)
    return run_federation(grid, cfg), grid


@pytest.fixture(scope="module")
def shared_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 3-round run with sharing on; every CADE.set_external_bank call is recorded."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    original = CADE.set_external_bank

    def spy(self, mu, sigma, modality="strong"):
        calls.append((modality, tuple(mu.shape)))
        return original(self, mu, sigma, modality)

    out = tmp_path_factory.mktemp("shared") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CADE, "set_external_bank", spy)
        results, grid = _run(data_root, out, "rounds=3")
    return results, grid, out, calls


def _audit(out: Path, event: str) -> list[dict]:
    lines = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == event]


def test_replies_carry_only_aggregates_of_the_model_width(shared_run):
    results, grid, _, _ = shared_run
    assert results["status"] == "completed"
    for server_round in (1, 2):
        trains = grid.trains(server_round)
        assert sorted(site for site, _, _ in trains) == ["c0-A1", "c0-A2", "c1-B2"]  # held-out never trains
        for _, _, reply in trains:
            assert set(reply.content.config_records) == {STYLE_KEY}
            record = reply.content.config_records[STYLE_KEY]
            assert set(record) == {f"{m}.{f}" for m in STYLE_MODALITIES for f in STYLE_FIELDS}
            for modality in STYLE_MODALITIES:
                assert isinstance(record[f"{modality}.count"], int) and record[f"{modality}.count"] >= 10
                for field in STYLE_FIELDS[1:]:
                    assert (
                        len(record[f"{modality}.{field}"]) == DIM
                    )  # one number per channel, no patient axis
    for _, _, reply in grid.trains(3):  # the last round: nothing would use the styles, none are sent
        assert STYLE_KEY not in reply.content.config_records
    for msg, reply in grid.log:
        if not msg.metadata.message_type.startswith("train"):
            assert STYLE_BANK_KEY not in msg.content.config_records
            assert STYLE_KEY not in reply.content.config_records


def test_server_pools_leave_one_out_and_next_round_carries_the_bank(shared_run):
    _, grid, out, _ = shared_run
    assert all(STYLE_BANK_KEY not in m.content.config_records for _, m, _ in grid.trains(1))
    sent = {
        site: record_to_summaries(reply.content.config_records[STYLE_KEY], WIDTHS)
        for site, _, reply in grid.trains(1)
    }
    for site, msg, _ in grid.trains(2):
        bank = record_to_summaries(msg.content.config_records[STYLE_BANK_KEY], WIDTHS)
        for modality in STYLE_MODALITIES:
            expected = pool_style_summaries([s[modality] for name, s in sorted(sent.items()) if name != site])
            assert bank[modality].count == expected.count
            np.testing.assert_array_equal(bank[modality].mu_mean, expected.mu_mean)
            np.testing.assert_array_equal(bank[modality].log_sigma_var, expected.log_sigma_var)
    assert ("train", HELDOUT_PARTITION) not in grid.sent
    events = _audit(out, "style_bank_pooled")
    assert [e["round"] for e in events] == [1, 2, 3]
    assert events[0]["sites"] == ["c0-A1", "c0-A2", "c1-B2"]
    assert events[0]["counts"]["c1-B2"] == {m: sent["c1-B2"][m].count for m in STYLE_MODALITIES}
    assert set(events[0]) == {"seq", "time", "event", "round", "sites", "counts", "prev_hash", "hash"}
    assert events[2]["sites"] == []


def test_client_cade_draws_from_the_installed_external_bank(shared_run):
    _, _, _, calls = shared_run
    # rounds 2 and 3, three training sites, both modalities, bank_size (64) styles of DIM channels each
    assert sorted(calls) == sorted([(m, (64, DIM)) for m in STYLE_MODALITIES] * 6)


def test_sharing_off_or_cade_off_sends_no_styles(data_root: Path, tmp_path: Path):
    for name, overrides in {"off": ("style_sharing=false",), "nocade": ("modules=none",)}.items():
        results, grid = _run(data_root, tmp_path / name, *overrides)
        assert results["status"] == "completed"
        for msg, reply in grid.log:
            if msg.metadata.message_type.split(".")[0] in ("train", "evaluate"):
                assert set(msg.content.config_records) == {"config"}, name
                assert not reply.content.config_records, name
        assert not _audit(tmp_path / name, "style_bank_pooled")


def _shrink_style(msg: Message, reply: Message) -> Message:
    record = reply.content.config_records.get(STYLE_KEY)
    if record is not None:
        record["strong.mu_mean"] = list(record["strong.mu_mean"])[:3]
    return reply


def test_malformed_style_reply_rejects_the_update_with_one_line_reason(data_root: Path, tmp_path: Path):
    results, _ = _run(data_root, tmp_path / "bad", "min_train_sites=1", faults={0: _shrink_style})
    assert results["status"] == "completed"
    reasons = {(r["site"], r["round"]): r["reason"] for r in results["rejections"]}
    reason = "style summary 'strong.mu_mean' has 3 values, expected 16 (its channels)"
    assert reasons == {("c0-A1", 1): reason}
    assert results["rounds"][0]["accepted"] == ["c0-A2", "c1-B2"]
    pooled = _audit(tmp_path / "bad", "style_bank_pooled")[0]
    assert pooled["sites"] == ["c0-A2", "c1-B2"]  # a rejected site's styles are not pooled


def _record(**changes) -> dict:
    record = {f"strong.{f}": [0.5] * DIM for f in STYLE_FIELDS[1:]} | {"strong.count": 12}
    return record | changes


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"strong.count": 2.5}, "'strong.count'=2.5 is not a finite non-negative integer"),
        ({"strong.count": 0}, "strong.count is 0"),
        ({"strong.mu_mean": [float("nan")] * DIM}, "'strong.mu_mean' holds NaN/Inf"),
        ({"strong.mu_var": [-1.0] * DIM}, "'strong.mu_var' holds a negative variance"),
        ({"strong.mu_mean": ["x"] * DIM}, "'strong.mu_mean' is not a list of numbers"),
        ({"patient.mu_mean": [0.0] * DIM}, "unknown key(s) ['patient.mu_mean']"),
        ({"weak.count": 12}, "style summary of 'weak' lacks"),
    ],
)
def test_check_style_record_rejects_with_one_line_reason(changes, reason):
    with pytest.raises(ReplyError) as error:
        check_style_record(_record(**changes), WIDTHS)
    assert reason in str(error.value) and "\n" not in str(error.value)


def _cade_after(n_bags: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.cade = CADE(p_aug=0.0, summary_min_count=10)
    model.cade.train()
    generator = torch.Generator().manual_seed(0)
    model.cade(
        torch.randn(n_bags, 5, DIM, generator=generator), torch.randn(n_bags, 3, DIM, generator=generator)
    )
    return model


def test_site_below_min_cases_or_min_count_sends_none(data_root: Path, tmp_path: Path):
    cfg = prepare(tiny_config(data_root, tmp_path / "unused", "modules=cade"))
    policy = DisclosurePolicy.load({"min-cases": 20})
    record = site_style_record(cfg, _cade_after(12), 20, policy, "s")
    assert isinstance(record, ConfigRecord) and record["strong.count"] == 12
    assert site_style_record(cfg, _cade_after(12), 19, policy, "s") is None  # 19 cases < min-cases 20
    assert site_style_record(cfg, _cade_after(9), 20, policy, "s") is None  # 9 bags < summary_min_count 10
    off = prepare(tiny_config(data_root, tmp_path / "unused", "modules=cade", "style_sharing=false"))
    assert site_style_record(off, _cade_after(12), 20, policy, "s") is None


def test_run_with_sharing_is_deterministic_for_a_seed(data_root: Path, tmp_path: Path):
    _run(data_root, tmp_path / "a")
    _run(data_root, tmp_path / "b")
    with (
        np.load(tmp_path / "a" / "final_weights.npz") as a,
        np.load(tmp_path / "b" / "final_weights.npz") as b,
    ):
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    assert _audit(tmp_path / "a", "style_bank_pooled")[0]["sites"]  # styles were shared
    _run(data_root, tmp_path / "off", "style_sharing=false")
    with (
        np.load(tmp_path / "a" / "final_weights.npz") as a,
        np.load(tmp_path / "off" / "final_weights.npz") as b,
    ):
        assert any(not np.array_equal(a[key], b[key]) for key in a.files)  # the shared bank changed training


def test_resume_after_round_1_sends_the_checkpointed_bank(shared_run, data_root: Path, tmp_path: Path):
    _, _, full_out, _ = shared_run
    killed = tmp_path / "killed"
    _run(data_root, killed, "rounds=3")
    for late in ("round-0002", "round-0003"):  # as if killed right after round 1
        shutil.rmtree(killed / "checkpoints" / late)
    (killed / "final_weights.npz").unlink()
    client_app.clear_caches()
    cfg = prepare(tiny_config(data_root, killed, "modules=cade", "rounds=3", f"resume={killed}"))
    grid = RecordingGrid(4)
    assert run_federation(grid, cfg)["rounds_completed"] == 3
    assert all(STYLE_BANK_KEY in m.content.config_records for _, m, _ in grid.trains(2))
    with np.load(full_out / "final_weights.npz") as a, np.load(killed / "final_weights.npz") as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])


def test_styles_at_the_input_are_shared_at_the_wsi_feature_width(data_root: Path, tmp_path: Path):
    """``model.cade.position=input``: the WSI styles are the patch features' (one number per feature
    channel), the expression styles the encoded tokens'; the server checks each at its width and the sites
    draw from it."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    original = CADE.set_external_bank

    def spy(self, mu, sigma, modality="strong"):
        calls.append((modality, tuple(mu.shape)))
        return original(self, mu, sigma, modality)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CADE, "set_external_bank", spy)
        results, grid = _run(data_root, tmp_path / "input", "rounds=3", "model.cade.position=input")
    assert results["status"] == "completed" and not results["rejections"]
    features = int(tiny_config(data_root, tmp_path).data.synth.feature_dim)
    assert features != DIM
    for _, _, reply in grid.trains(1):
        record = reply.content.config_records[STYLE_KEY]
        assert len(record["strong.mu_mean"]) == features and len(record["weak.mu_mean"]) == DIM
    assert sorted(calls) == sorted([("strong", (64, features)), ("weak", (64, DIM))] * 6)
