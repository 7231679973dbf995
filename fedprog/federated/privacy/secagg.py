"""SecAgg+ on Flower's legacy path: the site's ``NumPyClient`` app and the server's :func:`run_secagg`.

``secagg``
    SecAgg+ (Bell et al. 2020): the server only ever sees the sum of masked, quantised site models. Flower
    1.42 supports it only on the legacy path (``LegacyContext`` + ``DefaultWorkflow(fit_workflow=
    SecAggPlusWorkflow(...))`` on the server, ``secaggplus_mod`` around a ``NumPyClient`` on the site);
    :func:`run_secagg` and :func:`make_secagg_client_app` wrap that path.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import numpy as np
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
from flwr.app.constants import DEFAULT_TTL
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedprog.federated.privacy.mods import _privacy_keys
from fedprog.federated.privacy.settings import (
    KEY_NUM_EXAMPLES,
    PREFIX,
    PrivacyConfigError,
    PrivacySettings,
    SecAggError,
    SecAggSettings,
    parse_privacy,
)

log = logging.getLogger(__name__)

# Keys the legacy SecAgg+ path adds to the fit config (FitIns configs only hold scalars, hence JSON); the
# site removes them again before calling the train function.
KEY_ARRAY_NAMES = "secagg-fit.array-names"
KEY_SECAGG_CLIPPING_RANGE = "secagg-fit.clipping-range"
KEY_SECAGG_MAX_WEIGHT = "secagg-fit.max-weight"
_SECAGG_FIT_KEYS = frozenset({KEY_ARRAY_NAMES, KEY_SECAGG_CLIPPING_RANGE, KEY_SECAGG_MAX_WEIGHT})
KEY_SERVER_ROUND = "server-round"
# Flower's SimpleClientManager default wait when no SecAgg+ timeout is configured (seconds).
_DEFAULT_NODE_WAIT_S = 86400

TrainFn = Callable[[ArrayRecord, ConfigRecord, Context], tuple[ArrayRecord, MetricRecord]]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


# ----------------------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------------------


def _scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Scalar]:
    return {
        key: value for key, value in metrics.items() if isinstance(value, bool | int | float | str | bytes)
    }


class SecAggNumPyClient(NumPyClient):
    """Legacy ``NumPyClient`` that trains with a fedprog train function, for the SecAgg+ path.

    Parameters
    ----------
    train_fn : callable
        ``train_fn(arrays, config, context) -> (arrays, metrics)``: the same engine-based local training as
        the Message-API handler. ``arrays`` is the named global model (``ArrayRecord``), ``config`` the train
        ``ConfigRecord`` (``server-round`` plus the ServerApp's train config); it returns the updated model
        (same names) and a ``MetricRecord`` holding ``num-examples`` (the SecAgg+ aggregation weight).
    context : Context
        The ClientApp context (passed through to ``train_fn``).
    """

    def __init__(self, train_fn: TrainFn, context: Context) -> None:
        self.train_fn = train_fn
        self.site_context = context

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict]:
        """Train on the global model and return ``(parameters, num_examples, metrics)`` for SecAgg+.

        Raises
        ------
        PrivacyConfigError
            The site pins ``privacy.*`` settings in its node config (not applied on this path).
        SecAggError
            The fit config lacks the array names (not sent by :func:`run_secagg`), the weight
            ``num-examples`` is missing or above ``privacy.secagg.max_weight``, or a weighted parameter lies
            outside ``[-clipping_range, clipping_range]`` (SecAgg+ would clip it silently).
        """
        node = self.site_context.node_id
        pinned = _privacy_keys(self.site_context.node_config)
        if pinned:
            raise PrivacyConfigError(
                f"node_config {sorted(pinned)[0]} of node {node}: the SecAgg+ path applies no site-pinned "
                "privacy mechanism, so this site refuses to train rather than ignore its setting"
            )
        if KEY_ARRAY_NAMES not in config:
            raise SecAggError(
                f"node {node}: fit config has no {KEY_ARRAY_NAMES!r}; start rounds with run_secagg"
            )
        names = json.loads(str(config[KEY_ARRAY_NAMES]))
        if len(names) != len(parameters):
            raise SecAggError(f"node {node}: {len(parameters)} arrays received for {len(names)} names")
        clip = float(config[KEY_SECAGG_CLIPPING_RANGE])
        max_weight = float(config[KEY_SECAGG_MAX_WEIGHT])
        train_config = ConfigRecord({k: v for k, v in config.items() if k not in _SECAGG_FIT_KEYS})
        arrays = ArrayRecord({name: Array(np.asarray(a)) for name, a in zip(names, parameters, strict=True)})
        new_arrays, metrics = self.train_fn(arrays, train_config, self.site_context)
        if list(new_arrays.keys()) != names:
            raise SecAggError(
                f"node {node}: train_fn returned arrays {list(new_arrays.keys())[:3]}..., not {names[:3]}..."
            )
        weight = metrics.get(KEY_NUM_EXAMPLES)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise SecAggError(
                f"node {node}: train metrics need a positive {KEY_NUM_EXAMPLES!r}, got {weight!r}"
            )
        if weight > max_weight:
            raise SecAggError(
                f"node {node}: {KEY_NUM_EXAMPLES}={weight} exceeds {PREFIX}.secagg.max_weight="
                f"{max_weight:g}; SecAgg+ would overflow, raise max_weight"
            )
        out = new_arrays.to_numpy_ndarrays()
        ratio = weight / max_weight
        for name, array in zip(names, out, strict=True):
            peak = float(np.max(np.abs(array))) * ratio if array.size else 0.0
            if peak > clip:
                raise SecAggError(
                    f"node {node}: array {name!r} has |value| * num-examples / max_weight = {peak:.4g} > "
                    f"{PREFIX}.secagg.clipping_range={clip:g}; SecAgg+ would clip it. Raise clipping_range"
                )
        return out, int(weight), _scalar_metrics(metrics)


def make_secagg_client_app(train_fn: TrainFn) -> ClientApp:
    """Build the legacy ClientApp of the SecAgg+ path: ``secaggplus_mod`` around :class:`SecAggNumPyClient`.

    Parameters
    ----------
    train_fn : callable
        ``train_fn(arrays, config, context) -> (arrays, metrics)``, see :class:`SecAggNumPyClient`.

    Returns
    -------
    flwr.clientapp.ClientApp
        Serve it directly (tests, a secagg-only deployment) or route to it from the Message-API ClientApp
        with :func:`secagg_dispatch_mod`.
    """

    def client_fn(context: Context) -> Any:
        return SecAggNumPyClient(train_fn, context).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def _train_instruction(content: RecordDict, context: Context, group_id: str) -> Message:
    """A train message as the server would send it; built from explicit metadata because Flower's
    ``Message(content, dst_node_id, message_type)`` needs the process's ``TaskIdentity``, which the
    simulation runtime does not set in ClientApp actors."""
    metadata = Metadata(
        run_id=context.run_id,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=context.node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def train_fn_from_handler(
    handler: Callable[[Message, Context], Message], *, arrays_key: str = "arrays", config_key: str = "config"
) -> TrainFn:
    """Adapt a Message-API ``@app.train`` handler to the ``train_fn`` of :func:`make_secagg_client_app`.

    The handler receives a train message holding ``arrays_key`` (the global model) and ``config_key``; its
    reply must hold one ``ArrayRecord`` and one ``MetricRecord`` (with ``num-examples``).
    """

    def train_fn(
        arrays: ArrayRecord, config: ConfigRecord, context: Context
    ) -> tuple[ArrayRecord, MetricRecord]:
        content = RecordDict({arrays_key: arrays, config_key: config})
        msg = _train_instruction(content, context, str(config.get(KEY_SERVER_ROUND, "")))
        reply = handler(msg, context)
        if reply.has_error():
            raise SecAggError(f"node {context.node_id}: train handler failed: {reply.error.reason}")
        array_records = list(reply.content.array_records.values())
        metric_records = list(reply.content.metric_records.values())
        if len(array_records) != 1 or len(metric_records) != 1:
            raise SecAggError(
                f"node {context.node_id}: the train reply must hold one ArrayRecord and one MetricRecord, "
                f"got {len(array_records)} and {len(metric_records)}"
            )
        return array_records[0], metric_records[0]

    return train_fn


# ----------------------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------------------


def _named(ndarrays: list[np.ndarray], names: list[str], dtypes: list[np.dtype]) -> ArrayRecord:
    """Name the legacy (positional) arrays again and restore the dtypes of the initial model."""
    out = {}
    for name, array, dtype in zip(names, ndarrays, dtypes, strict=True):
        array = np.asarray(array)
        if np.issubdtype(dtype, np.integer):
            array = np.rint(array)
        out[name] = Array(array.astype(dtype, copy=False))
    return ArrayRecord(out)


def _weighted_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """Example-weighted mean of the numeric train metrics (they travel in the clear, outside SecAgg+)."""
    total = sum(n for n, _ in results)
    keys = set.intersection(*(set(m) for _, m in results)) if results else set()
    out: dict[str, Scalar] = {}
    for key in sorted(keys):
        values = [(n, m[key]) for n, m in results]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for _, v in values):
            out[key] = sum(n * float(v) for n, v in values) / total
    return out


class _SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg for the SecAgg+ workflow: trains exactly the given nodes, keeps names and dtypes."""

    def __init__(
        self,
        *,
        initial_arrays: ArrayRecord,
        settings: SecAggSettings,
        train_nodes: frozenset[int] | None,
        train_config: Mapping[str, Scalar],
        evaluate_fn: EvaluateFn | None,
        start_round: int = 0,
    ) -> None:
        self.start_round = int(start_round)
        self.names = list(initial_arrays.keys())
        initial = initial_arrays.to_numpy_ndarrays()
        self.dtypes = [a.dtype for a in initial]
        self.settings = settings
        self.train_nodes = train_nodes
        self.train_config = dict(train_config)
        self.user_evaluate_fn = evaluate_fn
        self.aggregated_rounds: set[int] = set()
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=settings.min_nodes,
            min_evaluate_clients=settings.min_nodes,
            min_available_clients=settings.min_nodes,
            evaluate_fn=self._evaluate if evaluate_fn is not None else None,
            accept_failures=True,
            initial_parameters=ndarrays_to_parameters(initial),
            fit_metrics_aggregation_fn=_weighted_metrics,
        )

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        return {
            **self.train_config,
            KEY_SERVER_ROUND: self.start_round + server_round,
            KEY_ARRAY_NAMES: json.dumps(self.names),
            KEY_SECAGG_CLIPPING_RANGE: self.settings.clipping_range,
            KEY_SECAGG_MAX_WEIGHT: self.settings.max_weight,
        }

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Send the global model to every training node (all connected nodes when none were given)."""
        wait_s = int(self.settings.timeout or _DEFAULT_NODE_WAIT_S)
        wanted = len(self.train_nodes) if self.train_nodes is not None else self.settings.min_nodes
        if not client_manager.wait_for(wanted, timeout=wait_s):
            raise SecAggError(f"round {server_round}: fewer than {wanted} nodes connected after {wait_s} s")
        proxies = list(client_manager.all().values())
        if self.train_nodes is not None:
            proxies = [proxy for proxy in proxies if proxy.node_id in self.train_nodes]
            missing = sorted(self.train_nodes - {proxy.node_id for proxy in proxies})
            if missing:
                raise SecAggError(f"round {server_round}: training node(s) {missing} are not connected")
        fit_ins = FitIns(parameters, self._fit_config(server_round))
        return [(proxy, fit_ins) for proxy in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Take SecAgg+'s unmasked weighted mean (every result carries it) and restore dtypes."""
        for failure in failures:
            log.warning("round %d: SecAgg+ site failure (treated as dropout): %s", server_round, failure)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        restored = _named(parameters_to_ndarrays(parameters), self.names, self.dtypes)
        self.aggregated_rounds.add(server_round)
        return ndarrays_to_parameters(restored.to_numpy_ndarrays()), metrics

    def _evaluate(
        self, server_round: int, ndarrays: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]] | None:
        metrics = cast(EvaluateFn, self.user_evaluate_fn)(
            self.start_round + server_round, _named(ndarrays, self.names, self.dtypes)
        )
        if metrics is None:
            return None
        return float(metrics.get("loss", math.nan)), _scalar_metrics(metrics)


def run_secagg(
    grid: Grid,
    context: Context,
    cfg: DictConfig | Mapping[str, Any] | PrivacySettings,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    fit_client: Collection[int] | None = None,
    *,
    train_config: Mapping[str, Scalar] | None = None,
    evaluate_fn: EvaluateFn | None = None,
    start_round: int = 0,
) -> ArrayRecord:
    """Run federated averaging with SecAgg+ (Flower's legacy ``DefaultWorkflow`` + ``SecAggPlusWorkflow``).

    Each round the server sends the global model to the training nodes, which train (the legacy app of
    :func:`make_secagg_client_app`) and upload masked, quantised ``num_examples * model / max_weight``; the
    server learns only the example-weighted mean of the site models, to within the quantisation error
    ``(number of sites) * 2 * clipping_range / quantization_range / sum(num_examples / max_weight)``.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    context : Context
        The ServerApp's context (wrapped in a ``LegacyContext``).
    cfg : DictConfig or Mapping or PrivacySettings
        ``cfg.privacy`` (or the full config holding a ``privacy`` key) with ``mode: secagg``.
    initial_arrays : ArrayRecord
        Initial global model, names and dtypes kept in the result; all values must stay within
        ``[-clipping_range, clipping_range]``.
    num_rounds : int
        Number of federated rounds.
    fit_client : collection of int or None
        Node IDs of the training sites (held-out sites excluded); ``None`` trains every connected node,
        after ``privacy.secagg.min_nodes`` have connected.
    train_config : mapping or None
        Scalars added to every fit config (``server-round`` is added for you).
    evaluate_fn : callable or None
        ``evaluate_fn(server_round, arrays) -> MetricRecord | None``, called on the global model at round 0
        and after every round, as in ``Strategy.start`` (per-round evaluation, checkpoints, reports).
    start_round : int
        Rounds already done (a resumed run): round ``k`` of this call is federation round
        ``start_round + k`` in the clients' ``server-round`` (their training seeds) and in ``evaluate_fn``.

    Returns
    -------
    ArrayRecord
        The final global model, with the names and dtypes of ``initial_arrays``.

    Raises
    ------
    PrivacyConfigError
        ``cfg`` is not a valid ``secagg`` config.
    SecAggError
        A round produced no aggregate (too many dropouts, a site error) and ``privacy.secagg.strict`` is on.
    """
    sa = _secagg_settings(cfg, num_rounds)
    train_nodes = frozenset(int(n) for n in fit_client) if fit_client is not None else None
    if train_nodes is not None and len(train_nodes) < 2:
        raise SecAggError(f"SecAgg+ needs at least 2 training nodes, got {sorted(train_nodes)}")
    strategy = _SecAggFedAvg(
        initial_arrays=initial_arrays,
        settings=sa,
        train_nodes=train_nodes,
        train_config=train_config or {},
        evaluate_fn=evaluate_fn,
        start_round=start_round,
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy)
    log.info("SecAgg+: %d rounds, %s", num_rounds, sa)
    _secagg_workflow(sa)(grid, legacy)
    failed = sorted(set(range(1, num_rounds + 1)) - strategy.aggregated_rounds)
    if failed:
        message = f"SecAgg+ produced no aggregate in round(s) {failed}; the model was not updated there"
        if sa.strict:
            raise SecAggError(message + f" (set {PREFIX}.secagg.strict=false to continue anyway)")
        log.error(message)
    final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    return _named(final, strategy.names, strategy.dtypes)


def _secagg_settings(
    cfg: DictConfig | Mapping[str, Any] | PrivacySettings, num_rounds: int
) -> SecAggSettings:
    """The ``privacy.secagg`` settings of ``cfg`` (the privacy section or the full config), checked."""
    if not isinstance(cfg, PrivacySettings) and PREFIX in cfg:
        cfg = cast(Any, cfg)[PREFIX]
    settings = parse_privacy(cfg)
    if settings.mode != "secagg" or settings.secagg is None:
        raise PrivacyConfigError(f"{PREFIX}.mode: run_secagg needs mode secagg, got {settings.mode!r}")
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise PrivacyConfigError(f"num_rounds: expected a positive integer, got {num_rounds!r}")
    return settings.secagg


def _secagg_workflow(sa: SecAggSettings) -> DefaultWorkflow:
    """Flower's legacy default workflow with the SecAgg+ fit workflow of settings ``sa``."""
    return DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=sa.num_shares,
            reconstruction_threshold=sa.reconstruction_threshold,
            max_weight=sa.max_weight,
            clipping_range=sa.clipping_range,
            quantization_range=sa.quantization_range,
            modulus_range=sa.modulus_range,
            timeout=sa.timeout,
        )
    )


#: Strategies whose aggregate SecAgg+ can compute: the example-weighted mean of the site models.
SECAGG_STRATEGIES = ("fedavg", "fedprox")


def run_secagg_rounds(
    grid: Grid,
    context: Context | None,
    cfg: DictConfig,
    arrays: ArrayRecord,
    start_round: int,
    train_nodes: Collection[int],
    train_config: Mapping[str, Scalar],
    after_round: Callable[[int, ArrayRecord], None],
) -> ArrayRecord:
    """Rounds ``start_round + 1 .. cfg.rounds`` of a federation with SecAgg+ (:func:`run_secagg`).

    The server sees only the masked sum, so per-site update screening (NaN, ``max_update_norm``) cannot run;
    ``after_round(server_round, arrays)`` (evaluation, privacy bookkeeping, checkpoint) follows every round,
    as on the Message-API path. Held-out sites never receive a training message (only ``train_nodes`` train)
    and still evaluate in ``after_round``. ``cfg`` is the run's config: ``strategy.name`` must be one of
    :data:`SECAGG_STRATEGIES` and ``weighting`` ``examples``; ``context`` None makes a fresh one.
    """
    from fedprog.federated.strategy import FederationError

    name = str(cfg.strategy.name)
    if name not in SECAGG_STRATEGIES:
        raise FederationError(
            f"privacy.mode=secagg gives the server only the weighted mean of the site models: use strategy "
            f"{' or '.join(SECAGG_STRATEGIES)}, not {name!r}"
        )
    if str(cfg.weighting) != "examples":
        raise FederationError(
            f"privacy.mode=secagg weights sites by num-examples, not weighting={cfg.weighting}"
        )
    rounds = int(cfg.rounds)
    if start_round >= rounds:
        return arrays
    config = dict(train_config)
    if name == "fedprox":
        config["proximal-mu"] = float(cfg.strategy.proximal_mu)

    def evaluate_fn(server_round: int, new_arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > start_round:  # not the legacy workflow's evaluation of the initial model
            after_round(server_round, new_arrays)
        return None

    if context is None:
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_secagg(
        grid,
        context,
        cfg.privacy,
        arrays,
        rounds - start_round,
        list(train_nodes),
        train_config=config,
        evaluate_fn=evaluate_fn,
        start_round=start_round,
    )
