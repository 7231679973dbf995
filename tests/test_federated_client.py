"""ClientApp handlers called directly: replies hold only model weights and aggregate metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fed_helpers import DirectGrid, tiny_config
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedprog.federated import client_app
from fedprog.federated.client_app import SiteRefusal
from fedprog.federated.fitting import describe_sites, fit_preprocessing, initial_weights
from fedprog.federated.messages import (
    ACTION_KEY,
    DESCRIBE_METRICS,
    EVAL_METRICS,
    FIT_METRICS,
    KM_GRID_KEY,
    PREP_KEY,
    TRAIN_METRICS,
    config_record,
)
from fedprog.federated.simulation import prepare
from fedprog.federated.strategy import numpy_to_arrays

KM_POINTS = 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("client") / "synth"
    cfg = prepare(tiny_config(root, root.parent / "out"))
    client_app.clear_caches()
    grid = DirectGrid(int(cfg.expected_sites))
    sites, extra = describe_sites(grid, grid.get_node_ids(), cfg)
    prep = fit_preprocessing(grid, cfg, [s for s in sites if s.role == "train"], extra)
    first = extra[sites[0].site]
    weights = initial_weights(cfg, prep, first["strong-kind"], first["strong-dim"])
    return cfg, grid, json.dumps(prep.state_dict()), weights


def _context(grid: DirectGrid, partition: int) -> Context:
    return grid.contexts[grid.node_ids[partition]]


def _message(kind: str, content: RecordDict, node: int) -> Message:
    return Message(content=content, message_type=kind, dst_node_id=node)


def _check_metrics(metrics, allowed, max_list_len):
    assert set(metrics) <= set(allowed), set(metrics) - set(allowed)
    for key, value in metrics.items():
        if isinstance(value, list):
            assert len(value) <= max_list_len, key


def test_train_reply_holds_only_weights_and_aggregates(setup):
    cfg, grid, prep, weights = setup
    record = config_record(cfg, **{PREP_KEY: prep, "server-round": 1})
    msg = _message(
        MessageType.TRAIN,
        RecordDict({"arrays": numpy_to_arrays(weights), "config": record}),
        grid.node_ids[0],
    )
    reply = client_app.handle_train(msg, _context(grid, 0))
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert list(reply.content.array_records) == ["arrays"] and not reply.content.config_records
    arrays = reply.content["arrays"]
    assert list(arrays.keys()) == list(weights)
    for key, array in arrays.items():
        assert array.numpy().shape == weights[key].shape
    metrics = reply.content["metrics"]
    _check_metrics(metrics, TRAIN_METRICS, max_list_len=0)
    assert metrics["num-examples"] == 20 and metrics["n-events"] > 0


def test_evaluate_reply_holds_only_aggregates(setup):
    cfg, grid, prep, weights = setup
    grid_points = np.linspace(0, 60, KM_POINTS).tolist()
    record = config_record(cfg, **{PREP_KEY: prep, KM_GRID_KEY: grid_points})
    for partition in range(4):
        msg = _message(
            MessageType.EVALUATE,
            RecordDict({"arrays": numpy_to_arrays(weights), "config": record}),
            grid.node_ids[partition],
        )
        reply = client_app.handle_evaluate(msg, _context(grid, partition))
        assert set(reply.content.keys()) == {"metrics"}
        metrics = reply.content["metrics"]
        _check_metrics(metrics, EVAL_METRICS, max_list_len=KM_POINTS)
        assert metrics["num-examples"] not in {len(v) for v in metrics.values() if isinstance(v, list)}
        assert 0.0 <= metrics["c-index"] <= 1.0


def test_queries_describe_and_heldout_refuses_fitting(setup):
    cfg, grid, _, _ = setup
    describe = config_record(cfg, **{ACTION_KEY: "describe"})
    reply = client_app.handle_query(
        _message(MessageType.QUERY, RecordDict({"config": describe}), grid.node_ids[2]), _context(grid, 2)
    )
    info = json.loads(reply.content["info"]["json"])
    assert info == {"site": "c1-B1", "role": "holdout", "cohort": "c1"}
    _check_metrics(reply.content["metrics"], DESCRIBE_METRICS, max_list_len=0)
    fit = config_record(cfg, **{ACTION_KEY: "fit-stats"})
    with pytest.raises(SiteRefusal, match="c1-B1 is held out"):
        client_app.handle_query(
            _message(MessageType.QUERY, RecordDict({"config": fit}), grid.node_ids[2]), _context(grid, 2)
        )
    reply = client_app.handle_query(
        _message(MessageType.QUERY, RecordDict({"config": fit}), grid.node_ids[0]), _context(grid, 0)
    )
    _check_metrics(reply.content["metrics"], FIT_METRICS, max_list_len=10_000)


def test_heldout_site_refuses_training(setup):
    cfg, grid, prep, weights = setup
    record = config_record(cfg, **{PREP_KEY: prep, "server-round": 1})
    msg = _message(
        MessageType.TRAIN,
        RecordDict({"arrays": numpy_to_arrays(weights), "config": record}),
        grid.node_ids[2],
    )
    with pytest.raises(SiteRefusal, match="held out and never trains"):
        client_app.handle_train(msg, _context(grid, 2))


def test_message_without_config_is_refused(setup):
    _, grid, _, _ = setup
    msg = _message(MessageType.QUERY, RecordDict({"config": ConfigRecord({"x": 1})}), grid.node_ids[0])
    with pytest.raises(SiteRefusal, match="no fedprog configuration"):
        client_app.handle_query(msg, _context(grid, 0))
