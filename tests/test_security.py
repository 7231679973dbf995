"""Security of the federation (issue 8): each test performs an attack or a fault and asserts it fails safely.

Runs use the in-process ``DirectGrid`` (no Ray): a fault function replaces a node's reply of one message type.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fed_helpers import DirectGrid, tiny_config
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from omegaconf import OmegaConf

from fedprog.federated import client_app, messages, simulation
from fedprog.federated.checkpoint import CheckpointError, list_checkpoints
from fedprog.federated.messages import (
    ACTION_KEY,
    FIT_STATS,
    KM_GRID_KEY,
    PREP_KEY,
    DescribeReply,
    ReplyError,
    config_record,
)
from fedprog.federated.server_app import RunFailed, run_federation
from fedprog.federated.strategy import arrays_to_numpy, build_strategy, numpy_to_arrays
from fedprog.report import UnsafePathError, safe_output_path

DEFAULT_OUT = "null"  # simulate.yaml's default (no out= given: a new time-stamped folder)
HELDOUT = 2  # partition of c1-B1, the held-out site of the tiny federation (c0-A1, c0-A2, c1-B1, c1-B2)
Fault = Callable[[Message, Message], Message]


class FaultyGrid(DirectGrid):
    """DirectGrid whose ``faults[(kind, partition)]`` replace the reply to any message type."""

    def __init__(self, n_nodes: int, faults: dict[tuple[str, int], Fault]) -> None:
        super().__init__(n_nodes)
        self.any_faults = faults

    def answer(self, msg: Message) -> Message:
        reply = super().answer(msg)
        key = (msg.metadata.message_type.split(".")[0], self.node_ids.index(msg.metadata.dst_node_id))
        return self.any_faults[key](msg, reply) if key in self.any_faults else reply


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sec") / "synth"
    simulation.prepare(tiny_config(root, root.parent / "unused"))
    return root


def _run(data_root: Path, out: Path, *overrides: str, faults=None) -> dict:
    client_app.clear_caches()
    cfg = simulation.prepare(tiny_config(data_root, out, "rounds=1", *overrides))
    return run_federation(FaultyGrid(int(cfg.expected_sites), faults or {}), cfg)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------ finding 3: untrusted replies
GLOBAL = {"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.float32)}
DECLARED = DescribeReply("a", "train", "c0", n_cases=20, n_events=8, n_train_cases=20)


def _screened(update: dict, metrics: dict) -> str:
    strategy = build_strategy({"name": "fedavg"}, max_update_norm=100.0)
    strategy.set_sites({1: "a"}, {1: "a"}, {"a": DECLARED})
    sent = list(strategy.configure_train(1, numpy_to_arrays(GLOBAL), ConfigRecord(), DirectGridStub([1])))
    reply = Message(
        RecordDict({"arrays": numpy_to_arrays(update), "metrics": MetricRecord(metrics)}), reply_to=sent[0]
    )
    report = strategy.last_round
    strategy._screen(1, [reply])
    return report.rejected[0].reason if report.rejected else ""


class DirectGridStub:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


@pytest.mark.parametrize(
    "update,metrics,reason",
    [
        ({"w": np.full((3, 4), 2**60, np.int64), "b": GLOBAL["b"]}, {}, "dtype int64"),
        ({"w": np.ones((3, 4), bool), "b": GLOBAL["b"]}, {}, "dtype bool"),
        ({"w": np.ones((3, 4), np.complex64), "b": GLOBAL["b"]}, {}, "dtype complex64"),
        ({"w": np.ones((4, 3), np.float32), "b": GLOBAL["b"]}, {}, "shape (4, 3)"),
        (GLOBAL, {"num-examples": 1e12}, "exceeds the 20 the site declared"),
        (GLOBAL, {"num-examples": -3}, "not a finite non-negative integer"),
        (GLOBAL, {"num-examples": float("nan")}, "not a finite non-negative integer"),
        (GLOBAL, {"n-events": 9}, "exceeds the 8"),
    ],
)
def test_forged_updates_and_counts_are_rejected_with_reason(update, metrics, reason):
    assert reason in _screened(update, {"num-examples": 10, "n-events": 2, **metrics})


def test_honest_update_passes_screening():
    assert _screened({k: v + 0.1 for k, v in GLOBAL.items()}, {"num-examples": 10, "n-events": 2}) == ""


def _array_fault(make: Callable[[np.ndarray], np.ndarray]) -> Fault:
    def fault(msg: Message, reply: Message) -> Message:
        arrays = arrays_to_numpy(reply.content["arrays"])
        first = next(iter(arrays))
        arrays[first] = make(arrays[first])
        reply.content["arrays"] = numpy_to_arrays(arrays)
        return reply

    return fault


def _metric_fault(key: str, value) -> Fault:
    def fault(msg: Message, reply: Message) -> Message:
        reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), key: value})
        return reply

    return fault


def test_forged_updates_in_a_run_are_rejected_and_the_run_completes(data_root: Path, tmp_path: Path):
    faults = {
        ("train", 0): _array_fault(lambda a: np.full(a.shape, 2**60, np.int64)),
        ("train", 1): _metric_fault("num-examples", 1e12),
        ("evaluate", 0): _metric_fault("c-index", 7.5),
        ("evaluate", 1): _metric_fault("n-events", -1),
    }
    results = _run(data_root, tmp_path / "run", "min_train_sites=1", faults=faults)
    assert results["status"] == "completed" and results["rounds"][0]["accepted"] == ["c1-B2"]
    reasons = {r["site"]: r["reason"] for r in results["rejections"]}
    assert "dtype int64" in reasons["c0-A1"] and "1e+12 exceeds" in reasons["c0-A2"]
    failures = {f["site"]: f["reason"] for f in results["failures"]}
    assert "'c-index'=7.5 outside [0, 1]" in failures["c0-A1"] and "'n-events'=-1" in failures["c0-A2"]
    with np.load(tmp_path / "run" / "final_weights.npz") as weights:
        assert max(float(np.abs(weights[k]).max()) for k in weights.files) < 100
    assert "Site failures" in (tmp_path / "run" / "report.md").read_text()


def _describe_fault(**changes) -> Fault:
    def fault(msg: Message, reply: Message) -> Message:
        info = json.loads(reply.content["info"]["json"])
        info.update(changes)
        info = {k: v for k, v in info.items() if v is not None}
        reply.content["info"] = ConfigRecord({"json": json.dumps(info)})
        return reply

    return fault


def test_describe_without_role_fails_the_run_by_name(data_root: Path, tmp_path: Path):
    with pytest.raises(
        RunFailed, match=r"1 site\(s\) failed before the first round: node-1003 .*lacks 'role'"
    ):
        _run(data_root, tmp_path / "run", faults={("query", 3): _describe_fault(role=None)})
    results = _results(tmp_path / "run")
    assert results["status"] == "failed" and results["failures"][0]["stage"] == "describe"
    assert (
        "allow_partial" in results["message"] and "node-1003" in (tmp_path / "run" / "report.md").read_text()
    )


def test_a_node_that_never_connects_is_reported_not_dropped(data_root: Path, tmp_path: Path):
    client_app.clear_caches()
    cfg = simulation.prepare(tiny_config(data_root, tmp_path / "run", "rounds=1", "node_wait_timeout=0.3"))
    cfg.expected_sites = 5  # one hospital never shows up
    with pytest.raises(RunFailed, match=r"1 of 5 expected node\(s\) did not connect"):
        run_federation(DirectGrid(4), cfg)
    assert _results(tmp_path / "run")["failures"][0]["stage"] == "connect"


# ------------------------------------------------------------------------------ finding 6: path traversal
def test_traversal_site_name_writes_nothing_outside_out(data_root: Path, tmp_path: Path):
    out = tmp_path / "deep" / "run"
    faults = {("query", 1): _describe_fault(site="../../evil")}
    with pytest.raises(RunFailed, match="not a safe name"):
        _run(data_root, out, faults=faults)
    results = _run(data_root, tmp_path / "partial", "allow_partial=true", faults=faults)
    assert results["status"] == "completed" and "not a safe name" in results["failures"][0]["reason"]
    assert results["headline"]["sites_failed"] == ["node-1001"]
    assert not list(tmp_path.rglob("*evil*"))
    with pytest.raises(UnsafePathError, match="not a safe file name"):
        safe_output_path(out, "km_../../evil.png")
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="outside the run folder"):
        safe_output_path(out, "link")


def test_km_plot_of_an_unsafe_site_name_is_not_drawn(tmp_path: Path):
    from fedprog.federated.outputs import RunState, write_outputs

    km = {"km-grid": [0.0, 10.0], "km-low": [1.0, 0.5], "km-high": [1.0, 0.4]}
    km.update({"km-n-low": 5, "km-n-high": 5, "km-events-low": 1, "km-events-high": 2})
    state = RunState(km={"../escape": km, "ok-site": km, "c3-D1@pooled": km})  # "@": a baseline's model
    cfg = tiny_config(tmp_path / "data", tmp_path / "out")
    write_outputs(
        tmp_path / "out",
        cfg,
        state=state,
        sites=[],
        final_arrays=None,
        status="completed",
        message="",
        prep={},
    )
    assert (tmp_path / "out" / "km_ok-site.png").is_file() and (
        tmp_path / "out" / "km_c3-D1@pooled.png"
    ).is_file()
    assert not (tmp_path / "km_..").exists() and not list(tmp_path.glob("*escape*"))


# ------------------------------------------------------------------------------ finding 4 + 5: failures named
def test_heldout_site_that_cannot_evaluate_fails_the_run_unless_allow_partial(
    data_root: Path, tmp_path: Path
):
    faults = {("evaluate", HELDOUT): _metric_fault("c-index", 7.5)}
    with pytest.raises(RunFailed, match=r"held-out site\(s\) c1-B1 .*outside \[0, 1\].*allow_partial"):
        _run(data_root, tmp_path / "strict", faults=faults)
    assert _results(tmp_path / "strict")["status"] == "failed"
    results = _run(data_root, tmp_path / "partial", "allow_partial=true", faults=faults)
    head = results["headline"]
    assert results["status"] == "completed" and head["heldout_sites_evaluated"] == 0
    assert head["heldout_sites"] == 1 and head["heldout_sites_missing"] == ["c1-B1"]
    assert "over 0 of 1 held-out site(s)" in (tmp_path / "partial" / "report.md").read_text()


def _corrupt_first_bag(root: Path) -> str:
    bag = sorted((root / "c1" / "features").iterdir())[0]
    bag.write_bytes(b"not a torch file")
    return bag.name


def test_corrupt_data_is_named_and_site_errors_are_sanitized(data_root: Path, tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    bag = _corrupt_first_bag(data)
    out = tmp_path / "run"
    with pytest.raises(RunFailed) as caught:
        _run(data, out, "audit.enabled=true")
    line = str(caught.value)
    assert "\n" not in line and "c1-B1" in line and "c1-B2" in line and "BagError" in line
    assert "<case>" in line and bag.split("-01Z")[0] not in line  # the file is named, the case id is masked
    cases = pd.read_csv(data / "c1" / "labels.csv")["case_id"]
    for name in ("results.json", "report.md", "audit.jsonl"):
        text = (out / name).read_text()
        assert str(data) not in text and "Traceback" not in text, name
        assert not any(case in text for case in cases), name


def test_sanitize_and_error_roundtrip():
    text = "Traceback (most recent call last):\n  File x\nValueError: /home/h/data/c0/SYNT-A1-0007.pt bad row"
    assert messages.sanitize(text, secrets=["SYNT-A1-0007"]) == "ValueError: <case>.pt bad row"
    error = messages.decode_error(messages.encode_error("c0-A1", KeyError("/srv/x/labels.csv: 'age'")))
    assert (error.site, error.error_class) == ("c0-A1", "KeyError") and "/srv" not in error.reason
    forged = messages.decode_error(json.dumps({"site": "../x", "error": "a b", "reason": "r\n" * 500}))
    assert forged.site is None and forged.error_class == "Error" and len(forged.reason) <= messages.MAX_REASON
    flower = messages.decode_error("<class 'flwr.X.ClientAppException'>:<'boom at /abs/path/f.py'>")
    assert flower.error_class == "ClientAppException" and "/abs" not in flower.reason


def test_describe_reply_checks():
    def reply(info: dict, metrics: dict) -> Message:
        query = Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=1)
        content = RecordDict(
            {"info": ConfigRecord({"json": json.dumps(info)}), "metrics": MetricRecord(metrics)}
        )
        return Message(content, reply_to=query)

    good = {"site": "c0-A1", "role": "train", "cohort": "c0"}
    counts = {"n-cases": 20, "n-events": 5, "n-train-cases": 20}
    assert messages.parse_describe(reply(good, counts)).n_train_cases == 20
    for info, metrics, reason in [
        ({**good, "site": "a/b"}, counts, "not a safe name"),
        ({**good, "site": "a..b"}, counts, "not a safe name"),
        ({**good, "role": "boss"}, counts, "role 'boss'"),
        (good, {**counts, "n-events": 21}, "exceeds"),
        (good, {**counts, "n-cases": 1.5}, "non-negative integer"),
    ]:
        with pytest.raises(ReplyError, match=reason):
            messages.parse_describe(reply(info, metrics))


# ------------------------------------------------------------------------------ finding 2: disclosure limits
@pytest.fixture(scope="module")
def fitted(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A run's config and fitted preprocessing (to build evaluate/fit-stats requests by hand)."""
    from fedprog.federated.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("fitted") / "run"
    _run(data_root, out)
    return simulation.prepare(tiny_config(data_root, out.parent / "x")), load_checkpoint(out)


def _ask(grid: DirectGrid, partition: int, kind: str, content: RecordDict) -> Message:
    msg = Message(content=content, message_type=kind, dst_node_id=grid.node_ids[partition])
    return grid.send_and_receive([msg])[0]


def _refusal(reply: Message) -> str:
    assert reply.has_error()
    error = messages.decode_error(reply.error.reason)
    assert error.error_class == "DisclosureRefusal", error
    return error.reason


def test_site_refuses_fine_histogram_and_fine_km_grid(fitted):
    cfg, checkpoint = fitted
    client_app.clear_caches()
    grid = DirectGrid(4)
    fine = OmegaConf.create(OmegaConf.to_container(cfg))
    fine.fit.time_grid_step = 0.005
    reply = _ask(grid, 0, "query", RecordDict({"config": config_record(fine, **{ACTION_KEY: FIT_STATS})}))
    assert "finer than this site's min-bin-width 1" in _refusal(reply)
    prep = json.dumps(checkpoint.federation["prep"])
    for grid_points, reason in [
        (np.linspace(0, 120, 40_000), "40000 points exceeds this site's km-max-points 20"),
        ([0.0, 0.5, 10.0], "0.5 months apart"),
    ]:
        record = config_record(cfg, **{PREP_KEY: prep, KM_GRID_KEY: list(map(float, grid_points))})
        content = RecordDict({"arrays": numpy_to_arrays(checkpoint.arrays), "config": record})
        assert reason in _refusal(_ask(grid, HELDOUT, "evaluate", content))


def test_km_points_with_small_risk_sets_are_suppressed():
    from fedprog.federated.federation import km_aggregates

    time = np.arange(1.0, 21.0)
    km = km_aggregates(time, np.zeros(20), time, np.array([0.0, 5.0, 8.0, 15.0]), min_at_risk=5)
    # the low-risk group is cases 1..10: 10, 6, 3 and 0 of them are at risk at 0, 5, 8 and 15 months
    assert np.isfinite(km["km-low"][:2]).all() and np.isnan(km["km-low"][2:]).all()


def test_site_below_min_cases_refuses_and_node_config_owns_the_limits(fitted):
    cfg, _ = fitted
    client_app.clear_caches()
    grid = DirectGrid(4)
    grid.contexts[grid.node_ids[0]].node_config["min-cases"] = 1000
    record = config_record(cfg, **{ACTION_KEY: FIT_STATS})
    assert "< this site's min-cases 1000" in _refusal(_ask(grid, 0, "query", RecordDict({"config": record})))
    assert not _ask(
        grid, 1, "query", RecordDict({"config": record})
    ).has_error()  # its neighbour's own limits


def test_server_cannot_redirect_a_deployed_sites_data_paths(data_root: Path, fitted, tmp_path: Path):
    cfg, _ = fitted
    node = {"site": "c0-A1", "cohort": "c0", "data-root": str(data_root), "role": "train"}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})
    hostile = OmegaConf.create(OmegaConf.to_container(cfg))
    hostile.data.labels = str(tmp_path / "attacker.csv")
    hostile.data.root = str(tmp_path)
    client_app.clear_caches()
    handle = client_app.resolve_site(hostile, context)  # the site's own manifest wins
    assert handle.layout.root == data_root and handle.layout.labels == "labels.csv"
    bare = tmp_path / "bare"
    shutil.copytree(data_root, bare)
    (bare / "fedprog.yaml").unlink()
    context.node_config["data-root"] = str(bare)
    client_app.clear_caches()
    with pytest.raises(client_app.SiteRefusal, match="data.labels: a path outside this site's data-root"):
        client_app.resolve_site(hostile, context)


# ------------------------------------------------------------------------------ finding 7: resume
def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_copy_leaves_the_original_untouched(data_root: Path, tmp_path: Path):
    original = tmp_path / "original"
    _run(data_root, original, "audit.enabled=true")
    before = _digest(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    client_app.clear_caches()
    cfg = simulation.prepare(tiny_config(data_root, DEFAULT_OUT, "rounds=2", f"resume={copy}"))
    assert cfg.out == str(copy.resolve())  # the folder resumed from, not the checkpoint's recorded out
    results = run_federation(DirectGrid(4), cfg)
    assert (
        results["rounds_completed"] == 2 and list_checkpoints(copy / "checkpoints")[-1].name == "round-0002"
    )
    assert _digest(original) == before
    assert cfg.audit.path == str(copy.resolve() / "audit.jsonl") and (
        copy / "audit.jsonl"
    ).stat().st_size > len(before["audit.jsonl"])

    from fedprog.federated.server_app import resolve_start

    raw = tiny_config(data_root, tmp_path / "server-out", f"resume={copy}")  # deployment: not prepare()-d
    resumed_cfg, checkpoint = resolve_start(raw)
    assert resumed_cfg.out == str(copy.resolve()) and resumed_cfg.run_id == checkpoint.run_id is not None

    elsewhere = tmp_path / "elsewhere"  # a new out= receives the continued run; the copy stays as it is
    after = _digest(copy)
    client_app.clear_caches()
    cfg = simulation.prepare(tiny_config(data_root, elsewhere, "rounds=3", f"resume={copy}"))
    assert run_federation(DirectGrid(4), cfg)["rounds_completed"] == 3 and _digest(copy) == after
    assert [p.name for p in list_checkpoints(elsewhere / "checkpoints")] == ["round-0003"]

    with pytest.raises(CheckpointError, match=r"seed=5 \(run has 0\) would change the resumed run"):
        simulation.prepare(tiny_config(data_root, DEFAULT_OUT, "seed=5", f"resume={copy}"))
    with pytest.raises(CheckpointError, match="rounds=1 is below the 2 rounds already run"):
        simulation.prepare(tiny_config(data_root, DEFAULT_OUT, "rounds=1", f"resume={copy}"))
    with pytest.raises(CheckpointError, match="already holds checkpoints of run"):
        simulation.prepare(tiny_config(data_root, copy))  # a new run never picks up another run's checkpoints


def test_resume_refuses_a_folder_mixing_two_runs(data_root: Path, tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    _run(data_root, first)
    _run(data_root, second, "rounds=2")
    shutil.rmtree(first / "checkpoints" / "round-0001")
    shutil.copytree(second / "checkpoints" / "round-0002", first / "checkpoints" / "round-0002")  # stale
    with pytest.raises(CheckpointError, match="belong to 2 different runs"):
        simulation.prepare(tiny_config(data_root, first, f"resume={first}"))


def test_bad_out_fails_before_start_up(data_root: Path, tmp_path: Path, capsys):
    (tmp_path / "file").write_text("x")
    assert simulation.main(tiny_config(data_root, tmp_path / "file")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "out=" in err and "is not a folder" in err


# -------------------------------------------------------------------------- bad-input sweep (finding 4, 10)
def _rename_genes(root: Path) -> str:
    path = next((root / "c1").glob("rna.*"))
    rna = pd.read_csv(path, index_col=0)
    rna.columns = [f"OTHER_{c}" for c in rna.columns]
    rna.to_csv(path)
    return "c1-B2"


def _nan_label(root: Path) -> str:
    path = root / "c0" / "labels.csv"
    labels = pd.read_csv(path)
    labels.loc[3, "survival_months"] = np.nan
    labels.to_csv(path, index=False)
    return "survival_months"


def _missing_feature_file(root: Path) -> str:
    sorted((root / "c0" / "features").iterdir())[5].unlink()
    return ""


CORRUPTIONS = {
    "corrupt bag in first case": (_corrupt_first_bag, "c1-B1"),
    "gene names share nothing": (_rename_genes, "c1"),
    "NaN in labels": (_nan_label, "survival_months"),
    "missing feature file": (_missing_feature_file, ""),
}


def _direct_simulation(cfg) -> dict:
    """``simulation.run_simulation`` on the in-process grid (same ServerApp code path, no Ray)."""
    return run_federation(DirectGrid(int(cfg.expected_sites)), cfg)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_bad_input_sweep_runs_or_stops_with_one_named_line(
    corruption: str, data_root: Path, tmp_path: Path, monkeypatch, capsys
):
    corrupt, named = CORRUPTIONS[corruption]
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    named = corrupt(data) and named
    monkeypatch.setattr(simulation, "run_simulation", _direct_simulation)
    client_app.clear_caches()
    rc = simulation.main(tiny_config(data, tmp_path / "run", "rounds=1"))
    captured = capsys.readouterr()
    if rc == 0:  # runs as documented: nothing dropped without a record
        results = _results(tmp_path / "run")
        assert results["status"] == "completed" and not results["failures"]
        assert results["headline"]["heldout_sites_evaluated"] == results["headline"]["heldout_sites"] == 1
        return
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert named in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.timeout(240)
def _fail_after(seconds: int):
    """Raise in the main thread after ``seconds`` (a regression that hangs fails instead of stalling CI)."""
    import signal

    def _raise(signum, frame):
        raise TimeoutError(f"no result within {seconds} s")

    signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)


def test_simulate_in_flower_runtime_names_a_corrupt_site_in_one_line(
    data_root: Path, tmp_path: Path, capsys, monkeypatch
):
    import signal

    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    _corrupt_first_bag(data)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster that is not there: Ray used to wait forever
    _fail_after(300)
    try:
        assert simulation.main(tiny_config(data, tmp_path / "run", "rounds=1")) == 1
    finally:
        signal.alarm(0)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SYNT-B1" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedprog simulate: failed:") and "c1-B1" in last and "BagError" in last, last
    assert _results(tmp_path / "run")["status"] == "failed"


# ------------------------------------------------------------------------------ finding 8: audit anchor
def test_results_json_anchors_the_audit_log_and_verify_detects_truncation(data_root: Path, tmp_path: Path):
    from fedprog.audit import verify_main
    from fedprog.config import load_config

    out = tmp_path / "run"
    results = _run(data_root, out, "audit.enabled=true", "rounds=1")
    log_path = out / "audit.jsonl"
    lines = log_path.read_text().splitlines()
    assert results["audit"] == {"last_hash": json.loads(lines[-1])["hash"], "entries": len(lines)}
    assert verify_main(load_config("audit", [f"path={log_path}", f"expect={out}"])) == 0
    assert results["audit"]["last_hash"] in (out / "report.md").read_text()
    log_path.write_text("\n".join(lines[:-1]) + "\n")  # the run's last entry deleted: still a valid chain
    assert verify_main(load_config("audit", [f"path={log_path}", f"expect={out}"])) == 1
