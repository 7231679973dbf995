"""Tests of fedprog.federated.privacy: configs, central DP wrappers + RDP accounting, local DP, SecAgg+."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedprog.federated import privacy as P

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NODES = [11, 12, 13]


def privacy_cfg(name: str, *overrides: str) -> dict:
    """Compose the privacy group alone, exactly as Hydra does inside a command config."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(overrides=[f"+privacy={name}", *overrides])
    return OmegaConf.to_container(cfg.privacy)


class FakeGrid:
    """Just enough of a Grid for FedAvg.configure_train: the connected node IDs."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def instruction(content: RecordDict, node_id: int = 1, message_type: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node_id}",
        src_node_id=0,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def context(node_id: int = 1, node_config: dict | None = None) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config=node_config or {}, state=RecordDict(), run_config={}
    )


def arrays(**named: np.ndarray) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in named.items()})


def reply_to(msg: Message, new: ArrayRecord, num_examples: int) -> Message:
    content = RecordDict(
        {"arrays": new, "metrics": MetricRecord({"num-examples": num_examples, "loss": 1.0})}
    )
    return Message(content, reply_to=msg)


def run_round(strategy, server_round: int, current: ArrayRecord, updates: dict[int, tuple[np.ndarray, int]]):
    """configure_train, site replies (current + update, weight), aggregate_train; no Flower runtime."""
    messages = list(strategy.configure_train(server_round, current, ConfigRecord(), FakeGrid(NODES)))
    replies = []
    for msg in messages:
        update, weight = updates[msg.metadata.dst_node_id]
        base = msg.content["arrays"]["w"].numpy()
        replies.append(reply_to(msg, arrays(w=base + update), weight))
    return messages, strategy.aggregate_train(server_round, replies)


@pytest.fixture(autouse=True)
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strategies build messages with the ServerApp process identity, which Flower's runtime normally sets."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def fedavg(**kwargs) -> FedAvg:
    return FedAvg(min_train_nodes=3, min_available_nodes=3, min_evaluate_nodes=3, **kwargs)


# ------------------------------------------------------------------ configs and validation


@pytest.mark.parametrize("name", ["none", "central_dp", "local_dp", "secagg"])
def test_config_group_composes_and_round_trips(name: str) -> None:
    raw = privacy_cfg(name)
    settings = P.parse_privacy(raw)
    assert settings.mode == name
    assert settings.to_config() == raw  # every key in the YAML is a known, validated setting
    flat = settings.to_flat()
    assert all(key.startswith("privacy.") for key in flat)
    assert P.parse_privacy(OmegaConf.to_container(P.from_run_config(flat).privacy)) == settings


@pytest.mark.parametrize(
    ("name", "override", "match"),
    [
        (
            "central_dp",
            "privacy.central_dp.noise_multiplier=-1",
            r"privacy\.central_dp\.noise_multiplier: expected >= 0",
        ),
        (
            "central_dp",
            "privacy.central_dp.noise_multiplier=0",
            r"privacy\.central_dp\.noise_multiplier: .*accounting",
        ),
        ("central_dp", "privacy.central_dp.clipping=both", r"privacy\.central_dp\.clipping: expected one of"),
        (
            "central_dp",
            "privacy.central_dp.clipping_norm=abc",
            r"privacy\.central_dp\.clipping_norm: expected a finite",
        ),
        (
            "central_dp",
            "+privacy.central_dp.noise_multipler=1",
            r"privacy\.central_dp\.noise_multipler: unknown key",
        ),
        (
            "central_dp",
            "privacy.central_dp.target_delta=1.5",
            r"privacy\.central_dp\.target_delta: expected a value",
        ),
        ("local_dp", "privacy.local_dp.epsilon=0", r"privacy\.local_dp\.epsilon: expected > 0"),
        ("local_dp", "privacy.local_dp.delta=1", r"privacy\.local_dp\.delta"),
        (
            "secagg",
            "privacy.secagg.modulus_range=3000000000",
            r"privacy\.secagg\.modulus_range: expected a power of 2",
        ),
        ("secagg", "privacy.secagg.num_shares=2", r"privacy\.secagg\.num_shares: expected an integer >= 3"),
        ("secagg", "privacy.secagg.reconstruction_threshold=5", r"privacy\.secagg\.reconstruction_threshold"),
        ("none", "privacy.mode=homomorphic", r"privacy\.mode: expected one of"),
        ("none", "+privacy.extra=1", r"privacy\.extra: unknown key"),
    ],
)
def test_invalid_settings_name_the_key(name: str, override: str, match: str) -> None:
    raw = privacy_cfg(name, override)
    if name == "secagg" and "reconstruction_threshold" in override:
        raw["secagg"]["num_shares"] = 5  # int threshold must be below int num_shares
    with pytest.raises(P.PrivacyConfigError, match=match):
        P.parse_privacy(raw)


def test_wrap_strategy_rejects_what_it_cannot_do() -> None:
    with pytest.raises(P.PrivacyConfigError, match=r"privacy\.mode=secagg .*run_secagg"):
        P.wrap_strategy(fedavg(), privacy_cfg("secagg"), 3)
    with pytest.raises(P.PrivacyConfigError, match=r"privacy\.central_dp\.accounting=true .*FedAdam"):
        P.wrap_strategy(FedAdam(), privacy_cfg("central_dp"), 3)
    with pytest.raises(
        P.PrivacyConfigError, match=r"privacy\.central_dp\.clipped_count_stddev: .*num_train_sites"
    ):
        P.wrap_strategy(fedavg(), privacy_cfg("central_dp", "privacy.central_dp.adaptive=true"), 3)
    with pytest.raises(P.PrivacyConfigError, match=r"num_train_sites: expected a positive integer"):
        P.wrap_strategy(fedavg(), privacy_cfg("central_dp"), 0)
    plain = fedavg()
    assert P.wrap_strategy(plain, privacy_cfg("none"), 3) is plain
    assert math.isnan(P.privacy_spent(plain)["epsilon"])


# ------------------------------------------------------------------ central DP


def test_server_side_clipping_and_uniform_mean_without_noise() -> None:
    cfg = privacy_cfg(
        "central_dp", "privacy.central_dp.noise_multiplier=0", "privacy.central_dp.accounting=false"
    )
    strategy = P.wrap_strategy(FedProx(proximal_mu=0.1, min_train_nodes=3, min_available_nodes=3), cfg, 3)
    assert isinstance(strategy, P.ServerSideFixedClippingDp)
    current = arrays(w=np.zeros(4))
    updates = {
        11: (np.array([0.3, 0.4, 0.0, 0.0]), 10),  # norm 0.5: kept
        12: (np.array([0.0, 0.0, 3.0, 4.0]), 100),  # norm 5: scaled to norm 1
        13: (np.array([-20.0, 0.0, 0.0, 0.0]), 1000),  # norm 20: scaled to norm 1
    }
    messages, (aggregate, metrics) = run_round(strategy, 1, current, updates)
    assert messages[0].content["config"]["privacy.mode"] == "central_dp"
    clipped = [np.array([0.3, 0.4, 0, 0]), np.array([0, 0, 0.6, 0.8]), np.array([-1.0, 0, 0, 0])]
    np.testing.assert_allclose(aggregate["w"].numpy(), np.mean(clipped, axis=0), atol=1e-12)
    assert metrics["loss"] == 1.0


def test_server_side_noise_has_the_configured_std() -> None:
    np.random.seed(0)
    z, clip, sites, size = 1.3, 0.5, 3, 200_000
    cfg = privacy_cfg(
        "central_dp", f"privacy.central_dp.noise_multiplier={z}", f"privacy.central_dp.clipping_norm={clip}"
    )
    strategy = P.wrap_strategy(fedavg(), cfg, sites)
    current = arrays(w=np.full(size, 0.25))
    step = np.zeros(size)
    step[0] = 1e-3  # a tiny update, far below the clipping norm
    _, (aggregate, _) = run_round(strategy, 1, current, {n: (step, 5 * n) for n in NODES})
    noise = aggregate["w"].numpy() - 0.25 - step
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(z * clip / sites, rel=0.01)


def test_unchanged_site_model_skips_the_round_instead_of_crashing() -> None:
    strategy = P.wrap_strategy(fedavg(), privacy_cfg("central_dp"), 3)
    current = arrays(w=np.ones(3))
    updates = {11: (np.zeros(3), 1), 12: (np.ones(3), 1), 13: (np.ones(3), 1)}
    _, (aggregate, metrics) = run_round(strategy, 1, current, updates)
    assert aggregate is None and metrics is None
    assert P.privacy_spent(strategy)["releases"] == 0
    _, (aggregate, _) = run_round(strategy, 2, current, {n: (np.ones(3), 1) for n in NODES})
    assert aggregate is not None and P.privacy_spent(strategy)["releases"] == 1


@pytest.mark.parametrize("adaptive", [False, True])
def test_accountant_matches_dp_accounting_and_grows(adaptive: bool) -> None:
    z, delta = 1.1, 1e-5
    overrides = [f"privacy.central_dp.noise_multiplier={z}", f"privacy.central_dp.target_delta={delta}"]
    if adaptive:
        overrides += ["privacy.central_dp.adaptive=true", "privacy.central_dp.clipped_count_stddev=1.0"]
    strategy = P.wrap_strategy(fedavg(), privacy_cfg("central_dp", *overrides), 3)
    assert P.privacy_spent(strategy)["epsilon"] == 0.0
    current = arrays(w=np.zeros(5))
    epsilons = []
    for server_round in range(1, 5):
        _, (aggregate, _) = run_round(
            strategy, server_round, current, {n: (np.ones(5) * n, n) for n in NODES}
        )
        current = aggregate
        spent = P.privacy_spent(strategy)
        reference = rdp.RdpAccountant()
        reference.compose(dp_event.GaussianDpEvent(z), server_round)
        assert spent["epsilon"] == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
        assert spent["delta"] == delta and spent["releases"] == server_round
        epsilons.append(spent["epsilon"])
    assert all(later > earlier for earlier, later in zip(epsilons, epsilons[1:], strict=False))


def test_accounting_around_fedprogs_heldout_aware_strategies() -> None:
    fed_strategy = pytest.importorskip("fedprog.federated.strategy")

    def build(name: str):
        strategy = fed_strategy.build_strategy({"name": name}, weighting="examples", min_train_sites=3)
        sites = {node: f"site{node}" for node in NODES}
        strategy.set_sites(sites, {**sites, 99: "heldout"})
        return strategy

    with pytest.raises(P.PrivacyConfigError, match=r"accounting=true .*HeldoutFedAdam"):
        P.wrap_strategy(build("fedadam"), privacy_cfg("central_dp"), 3)
    cfg = privacy_cfg("central_dp", "privacy.central_dp.noise_multiplier=2.0")
    strategy = P.wrap_strategy(build("fedavg"), cfg, 3)
    current = arrays(w=np.zeros(3))
    messages, (aggregate, _) = run_round(strategy, 1, current, {n: (np.ones(3) * 0.1, n) for n in NODES})
    assert sorted(m.metadata.dst_node_id for m in messages) == NODES  # the held-out node never trains
    assert aggregate is not None
    reference = rdp.RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(2.0), 1)
    assert P.privacy_spent(strategy)["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_budget_stops_before_exceeding_max_epsilon() -> None:
    reference = rdp.RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(1.0), 2)
    budget = reference.get_epsilon(1e-5) * 1.01  # room for two releases, not three
    cfg = privacy_cfg("central_dp", f"privacy.central_dp.max_epsilon={budget}")
    strategy = P.wrap_strategy(fedavg(), cfg, 3)
    current = arrays(w=np.zeros(2))
    for server_round in (1, 2):
        run_round(strategy, server_round, current, {n: (np.ones(2), 1) for n in NODES})
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon"):
        run_round(strategy, 3, current, {n: (np.ones(2), 1) for n in NODES})
    assert P.privacy_spent(strategy)["releases"] == 2


def test_client_side_clipping_through_privacy_mod() -> None:
    np.random.seed(1)
    cfg = privacy_cfg(
        "central_dp", "privacy.central_dp.clipping=client", "privacy.central_dp.clipping_norm=2.0"
    )
    strategy = P.wrap_strategy(fedavg(), cfg, 3)
    current = arrays(w=np.zeros(3))
    messages = list(strategy.configure_train(1, current, ConfigRecord(), FakeGrid(NODES)))
    config = messages[0].content["config"]
    assert config["clipping_norm"] == 2.0 and config["privacy.central_dp.clipping"] == "client"

    def site(msg: Message, ctx: Context) -> Message:
        return reply_to(msg, arrays(w=msg.content["arrays"]["w"].numpy() + np.array([30.0, 40.0, 0.0])), 7)

    out = P.privacy_mod(messages[0], context(11), site)
    np.testing.assert_allclose(out.content["arrays"]["w"].numpy(), [1.2, 1.6, 0.0])  # clipped to norm 2


# ------------------------------------------------------------------ local DP


def local_train_message(epsilon: float, clipping_norm: float = 1.0) -> Message:
    settings = P.parse_privacy(
        {"mode": "local_dp", "local_dp": {"epsilon": epsilon, "clipping_norm": clipping_norm, "delta": 1e-5}}
    )
    config = ConfigRecord({"lr": 0.1, **settings.to_flat()})
    return instruction(RecordDict({"arrays": arrays(w=np.zeros(100_000)), "config": config}))


def big_step(msg: Message, ctx: Context) -> Message:
    return reply_to(msg, arrays(w=np.full(100_000, 0.05)), 20)  # update norm 0.05 * sqrt(1e5) = 15.8


def test_local_dp_mod_clips_and_adds_calibrated_noise() -> None:
    np.random.seed(2)
    msg = local_train_message(epsilon=0.5)
    out = P.privacy_mod(msg, context(), big_step)
    w = out.content["arrays"]["w"].numpy()
    clipped = 0.05 / (0.05 * math.sqrt(100_000))  # each coordinate after clipping to norm 1
    expected_std = 1.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert w.mean() == pytest.approx(clipped, abs=4 * expected_std / math.sqrt(w.size))
    assert w.std() == pytest.approx(expected_std, rel=0.01)
    assert out.content["metrics"]["num-examples"] == 20


def test_local_dp_site_pin_overrides_and_conflicts() -> None:
    np.random.seed(3)
    msg = local_train_message(epsilon=1e6)  # server: negligible noise
    loose = P.privacy_mod(msg, context(), big_step).content["arrays"]["w"].numpy()
    np.testing.assert_allclose(np.linalg.norm(loose), 1.0, rtol=1e-3)  # only clipping
    pinned = context(node_config={"privacy.mode": "local_dp", "privacy.local_dp.epsilon": 0.5})
    strict = P.privacy_mod(msg, pinned, big_step).content["arrays"]["w"].numpy()
    assert strict.std() == pytest.approx(
        math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5, rel=0.02
    )  # site's epsilon
    central = instruction(
        RecordDict(
            {
                "arrays": arrays(w=np.zeros(3)),
                "config": ConfigRecord(P.parse_privacy(privacy_cfg("central_dp")).to_flat()),
            }
        )
    )
    with pytest.raises(
        P.PrivacyConfigError, match=r"node_config privacy\.mode='local_dp' of node 1 contradicts"
    ):
        P.privacy_mod(central, pinned, big_step)
    with pytest.raises(P.PrivacyConfigError, match=r"privacy\.mode='secagg' .*can only pin local_dp"):
        P.privacy_mod(msg, context(node_config={"privacy.mode": "secagg"}), big_step)


def test_privacy_mod_leaves_evaluate_and_plain_messages_alone() -> None:
    msg = instruction(RecordDict({"arrays": arrays(w=np.zeros(3)), "config": ConfigRecord({})}))
    assert P.privacy_mod(msg, context(), big_step).content["arrays"]["w"].numpy()[0] == 0.05
    evaluate = local_train_message(epsilon=0.5)
    evaluate = instruction(evaluate.content, message_type=MessageType.EVALUATE)

    def metrics_only(msg: Message, ctx: Context) -> Message:
        return Message(
            RecordDict({"metrics": MetricRecord({"c_index": 0.7, "num-examples": 3})}), reply_to=msg
        )

    out = P.privacy_mod(evaluate, context(), metrics_only)
    assert not out.has_error() and out.content["metrics"]["c_index"] == 0.7


def test_local_dp_strategy_announces_and_composes() -> None:
    strategy = P.wrap_strategy(fedavg(), privacy_cfg("local_dp", "privacy.local_dp.epsilon=0.4"), 3)
    current = arrays(w=np.zeros(2))
    for server_round in (1, 2, 3):
        messages, _ = run_round(strategy, server_round, current, {n: (np.ones(2), 1) for n in NODES})
    assert messages[0].content["config"]["privacy.local_dp.epsilon"] == 0.4
    spent = P.privacy_spent(strategy)
    assert spent == {"epsilon": pytest.approx(1.2), "delta": pytest.approx(3e-5), "releases": 3.0}


def test_client_mods_per_mode() -> None:
    assert P.client_mods(privacy_cfg("none")) == []
    assert P.client_mods(privacy_cfg("central_dp")) == []
    assert [
        m.__name__ for m in P.client_mods(privacy_cfg("central_dp", "privacy.central_dp.clipping=client"))
    ] == ["train_only_fixedclipping_mod"]
    assert P.client_mods(privacy_cfg("secagg"))[0].__name__ == "secaggplus_mod"
    assert P.client_mods(privacy_cfg("local_dp"))[0].__name__ == "train_only_LocalDpMod"


# ------------------------------------------------------------------ SecAgg+


def test_secagg_client_checks_weight_and_range() -> None:
    def train(arr: ArrayRecord, config: ConfigRecord, ctx: Context):
        assert config["server-round"] == 1 and config["fedprog.seed"] == 3 and len(config) == 2
        return arrays(a=arr["a"].numpy() + 9.0, b=arr["b"].numpy()), MetricRecord({"num-examples": 500})

    client = P.SecAggNumPyClient(train, context(5))
    config = {
        "server-round": 1,
        "fedprog.seed": 3,  # the ServerApp's own train-config keys reach the train function untouched
        P.KEY_ARRAY_NAMES: '["a", "b"]',
        P.KEY_SECAGG_CLIPPING_RANGE: 8.0,
        P.KEY_SECAGG_MAX_WEIGHT: 1000.0,
    }
    params, weight, _ = client.fit([np.zeros(2), np.ones(3)], dict(config))
    assert weight == 500 and params[0][0] == 9.0  # 9 * 500 / 1000 = 4.5 fits in [-8, 8]
    with pytest.raises(P.SecAggError, match=r"array 'a' .* privacy\.secagg\.clipping_range=8"):
        client.fit([np.ones(2), np.ones(3)], {**config, P.KEY_SECAGG_MAX_WEIGHT: 500.0})
    with pytest.raises(P.SecAggError, match=r"num-examples=500 exceeds privacy\.secagg\.max_weight=100"):
        client.fit([np.zeros(2), np.ones(3)], {**config, P.KEY_SECAGG_MAX_WEIGHT: 100.0})
    pinned = P.SecAggNumPyClient(train, context(5, {"privacy.mode": "local_dp"}))
    with pytest.raises(P.PrivacyConfigError, match=r"node_config privacy\.mode of node 5: the SecAgg\+ path"):
        pinned.fit([np.zeros(2), np.ones(3)], dict(config))


def test_legacy_messages_are_dispatched() -> None:
    seen = []

    def legacy_app(msg: Message, ctx: Context) -> Message:
        seen.append("legacy")
        return msg

    mod = P.secagg_dispatch_mod(legacy_app)  # type: ignore[arg-type]
    legacy = instruction(RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}))
    modern = instruction(RecordDict({"arrays": arrays(w=np.zeros(1)), "config": ConfigRecord({})}))
    mod(legacy, context(), lambda m, c: pytest.fail("legacy message reached the Message-API handler"))
    assert mod(modern, context(), lambda m, c: m) is modern and seen == ["legacy"]


SECAGG_WEIGHTS = {0: 10, 1: 20, 2: 70}


def fixed_site_model(
    arr: ArrayRecord, config: ConfigRecord, ctx: Context
) -> tuple[ArrayRecord, MetricRecord]:
    """A site that 'trains' to a known model: value depends on its partition only (no training)."""
    pid = int(ctx.node_config["partition-id"])
    rng = np.random.default_rng(pid)
    new = {name: Array((rng.uniform(-3, 3, a.shape)).astype(np.float32)) for name, a in arr.items()}
    return ArrayRecord(new), MetricRecord({"num-examples": SECAGG_WEIGHTS[pid], "loss": float(pid)})


def combined_client_app() -> ClientApp:
    """The documented single ClientApp: Message-API handlers, SecAgg+ rounds dispatched to the legacy app."""

    def train(msg: Message, ctx: Context) -> Message:
        new, metrics = fixed_site_model(msg.content["arrays"], msg.content["config"], ctx)
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    secagg_app = P.make_secagg_client_app(P.train_fn_from_handler(train))
    app = ClientApp(mods=[P.secagg_dispatch_mod(secagg_app), P.privacy_mod])
    app.train()(train)
    return app


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", ["legacy_app", "combined_app"])
def test_secagg_matches_fedavg_within_quantisation_error(client: str) -> None:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    initial = arrays(layer=np.zeros((4, 5), np.float32), bias=np.zeros(5, np.float32))
    cfg = privacy_cfg("secagg", "privacy.secagg.max_weight=100.0", "privacy.secagg.num_shares=3",
                      "privacy.secagg.reconstruction_threshold=2")  # fmt: skip
    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, ctx: Context) -> None:
        rounds = []
        result["final"] = P.run_secagg(
            grid, ctx, cfg, initial, 1, None, evaluate_fn=lambda r, a: rounds.append(r) or None
        )
        result["rounds"] = rounds

    client_app = (
        P.make_secagg_client_app(fixed_site_model) if client == "legacy_app" else combined_client_app()
    )
    run_simulation(server_app, client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})  # fmt: skip

    final = result["final"]
    assert list(final.keys()) == ["layer", "bias"] and final["layer"].numpy().dtype == np.float32
    assert result["rounds"] == [0, 1]
    site_models = [
        fixed_site_model(initial, ConfigRecord(), context(node_config={"partition-id": p}))[0]
        for p in range(3)
    ]
    weights = np.array([SECAGG_WEIGHTS[p] for p in range(3)], float)
    sa = P.parse_privacy(cfg).secagg
    ratios = weights / sa.max_weight
    tolerance = len(weights) * (2 * sa.clipping_range / sa.quantization_range) / ratios.sum() * 1.5
    for name in final.keys():
        stacked = np.stack([m[name].numpy().astype(float) for m in site_models])
        expected = np.tensordot(weights, stacked, axes=1) / weights.sum()
        got = final[name].numpy().astype(float)
        np.testing.assert_allclose(got, expected, atol=tolerance + 1e-6)
        assert np.abs(stacked.mean(axis=0) - expected).max() > 100 * tolerance  # weighting really matters
