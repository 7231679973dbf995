"""Held-out-aware strategies: weighted aggregation, update screening, node restriction, optimizer state."""

from __future__ import annotations

import math

import fed_helpers  # noqa: F401 - sets Flower's TaskIdentity so Messages can be built
import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedprog.federated.strategy import (
    FederationError,
    TooFewSitesError,
    build_strategy,
    check_update,
    event_weighted_summary,
    numpy_to_arrays,
)

RNG = np.random.default_rng(0)
GLOBAL = {"w": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=4).astype(np.float32)}


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _reply(to: Message, arrays: dict, metrics: dict) -> Message:
    return Message(
        RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": MetricRecord(metrics)}), reply_to=to
    )


def _setup(name="fedavg", weighting="examples", **kw):
    strategy = build_strategy({"name": name}, weighting=weighting, **kw)
    strategy.set_sites({1: "a", 2: "b", 3: "c"}, {1: "a", 2: "b", 3: "c", 9: "held"})
    messages = list(
        strategy.configure_train(1, numpy_to_arrays(GLOBAL), ConfigRecord(), FakeGrid([1, 2, 3, 9]))
    )
    return strategy, {m.metadata.dst_node_id: m for m in messages}


def _update(scale):
    return {k: v + np.float32(scale) for k, v in GLOBAL.items()}


def test_training_messages_never_reach_heldout_nodes():
    _, messages = _setup()
    assert sorted(messages) == [1, 2, 3]
    strategy = build_strategy({"name": "fedavg"})
    strategy.set_sites({1: "a"}, {1: "a", 9: "held"})
    evaluate = strategy.configure_evaluate(1, numpy_to_arrays(GLOBAL), ConfigRecord(), FakeGrid([1, 9]))
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [1, 9]


def test_only_heldout_sites_are_asked_for_kaplan_meier_curves():
    from fedprog.federated.messages import KM_GRID_KEY

    strategy = build_strategy({"name": "fedavg"})
    strategy.set_sites({1: "a"}, {1: "a", 9: "held"})
    config = ConfigRecord({KM_GRID_KEY: [0.0, 12.0], "other": 1})
    evaluate = strategy.configure_evaluate(3, numpy_to_arrays(GLOBAL), config, FakeGrid([1, 9]))
    sent = {m.metadata.dst_node_id: m.content["config"] for m in evaluate}
    assert KM_GRID_KEY in sent[9] and KM_GRID_KEY not in sent[1]
    assert sent[1]["other"] == sent[9]["other"] == 1 and sent[1]["server-round"] == 3


@pytest.mark.parametrize("weighting,key", [("examples", "num-examples"), ("events", "n-events")])
def test_aggregate_is_weighted_mean_of_updates(weighting, key):
    strategy, messages = _setup(weighting=weighting)
    updates = {1: _update(0.1), 2: _update(-0.3), 3: _update(0.7)}
    weights = {1: 10, 2: 30, 3: 60}
    replies = [
        _reply(
            messages[n],
            updates[n],
            {
                "num-examples": weights[n] if key == "num-examples" else 1,
                "n-events": weights[n] if key == "n-events" else 1,
            },
        )
        for n in (3, 1, 2)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    total = sum(weights.values())
    for name in GLOBAL:
        expected = sum(weights[n] * updates[n][name].astype(np.float64) for n in updates) / total
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6)
        assert arrays[name].numpy().dtype == GLOBAL[name].dtype


def test_nan_update_and_client_error_are_left_out_with_reason(caplog):
    strategy, messages = _setup(max_update_norm=100.0)
    bad = _update(0.0)
    bad["w"][0, 0] = np.nan
    replies = [
        _reply(messages[1], _update(0.2), {"num-examples": 5, "n-events": 2}),
        _reply(messages[2], bad, {"num-examples": 5, "n-events": 2}),
        Message(Error(code=1, reason="disk on fire"), reply_to=messages[3]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), _update(0.2)["w"], rtol=1e-6)
    reasons = {r.site: r.reason for r in strategy.last_round.rejected}
    assert "NaN/Inf" in reasons["b"] and "disk on fire" in reasons["c"]
    assert "site b" in caplog.text and "site c" in caplog.text
    assert strategy.last_round.accepted == ["a"]


def test_implausible_norm_rejected_and_too_few_sites_raises():
    strategy, messages = _setup(max_update_norm=1.0, min_train_sites=2)
    replies = [
        _reply(messages[1], _update(0.01), {"num-examples": 5, "n-events": 2}),
        _reply(messages[2], _update(50.0), {"num-examples": 5, "n-events": 2}),
    ]
    with pytest.raises(TooFewSitesError, match="min_train_sites=2.*exceeds max_update_norm"):
        strategy.aggregate_train(1, replies)


def test_check_update_reasons():
    assert check_update(GLOBAL, GLOBAL, max_update_norm=None) == (None, 0.0)
    reason, _ = check_update({"w": GLOBAL["w"]}, GLOBAL, max_update_norm=None)
    assert "missing ['b']" in reason
    reason, _ = check_update({"w": GLOBAL["w"][:2], "b": GLOBAL["b"]}, GLOBAL, max_update_norm=None)
    assert "shape" in reason


def test_fedadam_state_roundtrip():
    strategy, messages = _setup(name="fedadam")
    replies = [_reply(messages[n], _update(0.1 * n), {"num-examples": 5, "n-events": 2}) for n in (1, 2, 3)]
    strategy.aggregate_train(1, replies)
    state = strategy.state_dict()
    assert {k.split("/")[0] for k in state} == {"m_t", "v_t"}
    fresh = build_strategy({"name": "fedadam"})
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.v_t["w"], strategy.v_t["w"])


def test_build_strategy_errors():
    with pytest.raises(FederationError, match="unknown strategy 'fedfoo'"):
        build_strategy({"name": "fedfoo"})
    with pytest.raises(FederationError, match="baseline"):
        build_strategy({"name": "local"})
    with pytest.raises(FederationError, match="unknown key"):
        build_strategy({"name": "fedavg", "eta": 0.1})
    with pytest.raises(FederationError, match="weighting"):
        build_strategy({"name": "fedavg"}, weighting="patients")


def test_event_weighted_summary():
    summary = event_weighted_summary(
        [
            {"c-index": 0.6, "n-events": 30, "num-examples": 100},
            {"c-index": 0.8, "n-events": 10, "num-examples": 10},
            {"c-index": math.nan, "n-events": 5, "num-examples": 5},
        ]
    )
    assert summary["c-index"] == pytest.approx(0.65)
    assert summary["n-events"] == 45
