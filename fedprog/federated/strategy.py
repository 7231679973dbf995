"""Held-out-aware Flower strategies: train only on training sites, evaluate everywhere, reject bad updates."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi

from fedprog.federated import messages
from fedprog.federated.errors import FederationError, RunFailed, TooFewSitesError  # noqa: F401 - re-exported
from fedprog.federated.messages import DescribeReply, ReplyError
from fedprog.federated.newton import FedNewton

log = logging.getLogger(__name__)

#: ``weighting`` config value -> the reply metric that weights a client's update.
WEIGHT_KEYS = {"examples": "num-examples", "events": "n-events"}

#: The Flower classes behind ``strategy.name``; ``local`` and ``pooled`` are baselines without Flower.
FLOWER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "newton": FedNewton,
}
BASELINES = ("local", "pooled")

#: Constructor arguments each ``strategy`` config may set (besides ``name``), by strategy name.
_STRATEGY_ARGS = {
    "fedavg": ("fraction_train",),
    "fedprox": ("fraction_train", "proximal_mu"),
    "fedadam": ("fraction_train", "eta", "eta_l", "beta_1", "beta_2", "tau"),
    "fedyogi": ("fraction_train", "eta", "eta_l", "beta_1", "beta_2", "tau"),
    "fedadagrad": ("fraction_train", "eta", "eta_l", "tau"),
    "newton": ("fraction_train", "max_step", "damping"),
}


@dataclass(frozen=True)
class Rejection:
    """One reply left out of aggregation, with the reason (logged and audited)."""

    site: str
    node_id: int
    reason: str


@dataclass
class RoundReport:
    """What happened to the replies of one training round."""

    server_round: int
    sent: dict[str, int] = field(default_factory=dict)  # site -> node id
    accepted: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    update_norms: dict[str, float] = field(default_factory=dict)  # site -> L2 norm of (update - global)
    update_bytes: dict[str, int] = field(default_factory=dict)
    train_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Return ``{name: ndarray}`` of an ArrayRecord (copies nothing Flower has not already decoded)."""
    return {key: array.numpy() for key, array in arrays.items()}


def numpy_to_arrays(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap ``{name: ndarray}`` into an ArrayRecord, keeping the key order."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all floating-point arrays.

    Parameters
    ----------
    update, reference : mapping of str to ndarray
        Model weights with the same keys and shapes (any float dtype).

    Returns
    -------
    float
        ``sqrt(sum_k ||update_k - reference_k||^2)``; integer arrays (counters) are ignored.
    """
    total = 0.0
    for key, value in update.items():
        if not np.issubdtype(value.dtype, np.floating):
            continue
        delta = value.astype(np.float64) - np.asarray(reference[key], dtype=np.float64)
        total += float(np.sum(delta * delta))
    return math.sqrt(total)


def check_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_update_norm: float | None,
) -> tuple[str | None, float]:
    """Check one client update against the global weights it was trained from.

    Parameters
    ----------
    update : mapping of str to ndarray
        The weights a client sent back.
    reference : mapping of str to ndarray
        The global weights of this round.
    max_update_norm : float or None
        Largest plausible ``||update - reference||_2``; ``None`` disables the check.

    Returns
    -------
    reason : str or None
        Why the update must be rejected, or ``None`` when it is usable.
    norm : float
        The update's L2 distance to ``reference`` (NaN when it could not be computed).
    """
    try:
        messages.check_update(update, reference)
    except ReplyError as error:
        return str(error), math.nan
    norm = update_norm(update, reference)
    if not math.isfinite(norm):
        return "update norm is not finite", norm
    if max_update_norm is not None and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max_update_norm={max_update_norm:g}", norm
    return None, norm


class _NodeView:
    """A view of a Grid that lists only some node ids; Flower's own sampling then runs inside the view."""

    def __init__(self, grid: Grid, allowed: Iterable[int]) -> None:
        self._grid = grid
        self._allowed = set(allowed)

    def get_node_ids(self) -> list[int]:
        """Connected node ids that are also allowed, sorted (sampling then depends only on the RNG)."""
        return sorted(node for node in self._grid.get_node_ids() if node in self._allowed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class HeldoutAwareMixin:
    """Mixed in front of a Flower strategy: training sites train, every site evaluates, bad updates drop out.

    The server calls :meth:`set_sites` once the start-of-run query has told it which node is which site; from
    then on ``configure_train`` only ever addresses training nodes (held-out sites never receive a training
    message), ``configure_evaluate`` addresses every known node, and ``aggregate_train`` drops error replies,
    replies from unexpected nodes and updates with NaN/Inf or an implausible norm before Flower's own weighted
    aggregation. Replies are aggregated in site-name order, so a run is bit-for-bit repeatable.
    """

    min_train_sites: int = 1
    max_update_norm: float | None = None

    def set_sites(
        self,
        train_nodes: Mapping[int, str],
        eval_nodes: Mapping[int, str],
        declared: Mapping[str, DescribeReply] | None = None,
    ) -> None:
        """Register ``{node_id: site}`` of the training and of all evaluating nodes, and each site's describe
        reply (``declared``: the counts that bound its later replies)."""
        overlap = set(train_nodes) - set(eval_nodes)
        if overlap:
            raise FederationError(f"training nodes {sorted(overlap)} are not among the evaluating nodes")
        self.train_nodes = dict(train_nodes)
        self.eval_nodes = dict(eval_nodes)
        self.last_round: RoundReport | None = None
        self.last_eval: dict[str, dict[str, float]] = {}
        self.eval_failures: dict[str, str] = {}  # site -> why its evaluation reply was unusable
        self.declared = dict(declared or {})

    def _site(self, node_id: int) -> str:
        return self.eval_nodes.get(node_id, f"<unknown node {node_id}>")

    # ----------------------------------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's configure_train on a view of the grid that holds only the training nodes."""
        view = _NodeView(grid, self.train_nodes)
        connected = view.get_node_ids()
        if len(connected) < self.min_train_sites:
            raise TooFewSitesError(
                f"round {server_round}: {len(connected)} training site(s) connected "
                f"({[self.train_nodes[n] for n in connected]}), min_train_sites={self.min_train_sites}"
            )
        self._global = arrays_to_numpy(arrays)
        messages = list(super().configure_train(server_round, arrays, config, view))  # noqa: E501  # type: ignore[misc]
        leaked = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.train_nodes]
        if leaked:  # never reached with _NodeView; kept as a hard guarantee for held-out sites
            raise FederationError(f"refusing to send training messages to non-training nodes {leaked}")
        self.last_round = RoundReport(
            server_round,
            sent={self.train_nodes[m.metadata.dst_node_id]: m.metadata.dst_node_id for m in messages},
        )
        return messages

    def _screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Split replies into usable ones (sorted by site) and rejections recorded in ``last_round``."""
        report = self.last_round or RoundReport(server_round)
        self.last_round = report
        weight_key = self.weighted_by_key  # type: ignore[attr-defined]
        usable: list[tuple[str, Message]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            site = self._site(node)
            reason = self._check_train_reply(msg, site, report)
            if reason is None:
                usable.append((site, msg))
            else:
                report.rejected.append(Rejection(site, node, reason))
                log.warning(
                    "round %d: update of site %s (node %d) rejected: %s", server_round, site, node, reason
                )
        usable.sort(key=lambda item: item[0])
        total_weight = sum(report.train_metrics[site][weight_key] for site, _ in usable)
        if usable and total_weight <= 0:
            for site, msg in usable:
                report.rejected.append(Rejection(site, msg.metadata.src_node_id, f"total {weight_key} is 0"))
            usable = []
        report.accepted = [site for site, _ in usable]
        return [msg for _, msg in usable]

    def _check_train_reply(self, msg: Message, site: str, report: RoundReport) -> str | None:
        """Why a training reply is unusable (None when usable); records its norm, size and metrics."""
        if msg.metadata.src_node_id not in self.train_nodes:
            return "reply from a node that is not a training site"
        error = messages.reply_error(msg)
        if error is not None:
            return f"client error: {error}"
        if len(msg.content.array_records) != 1 or len(msg.content.metric_records) != 1:
            return "reply must hold exactly one ArrayRecord and one MetricRecord"
        try:
            metrics = messages.check_train_metrics(
                messages.reply_metrics(msg),
                self.declared.get(site),
                self.weighted_by_key,  # type: ignore[attr-defined]
            )
            update = arrays_to_numpy(next(iter(msg.content.array_records.values())))
        except (ReplyError, TypeError, ValueError) as error:
            return messages.sanitize(str(error))
        reason, norm = self.check_reply_arrays(update)
        report.update_norms[site] = norm
        report.update_bytes[site] = int(sum(v.nbytes for v in update.values()))
        report.train_metrics[site] = metrics
        return reason

    def check_reply_arrays(self, update: Mapping[str, np.ndarray]) -> tuple[str | None, float]:
        """Why a reply's arrays are unusable (None when usable) and their norm: weights are checked against
        the global model (:func:`check_update`); a strategy whose replies are not weights
        (:class:`~fedprog.federated.newton.FedNewton`) defines its own check, which this defers to."""
        own = getattr(super(), "check_reply_arrays", None)
        if own is not None:
            return own(update)
        return check_update(update, self._global, max_update_norm=self.max_update_norm)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies, then aggregate the usable ones with the Flower strategy (mean, FedOpt step)."""
        usable = self._screen(server_round, replies)
        if len(usable) < self.min_train_sites:
            report = self.last_round
            failed = {r.site: r.reason for r in report.rejected} if report else {}
            raise TooFewSitesError(
                f"round {server_round}: {len(usable)} usable update(s) "
                f"from {report.accepted if report else []}, "
                f"min_train_sites={self.min_train_sites}; left out: {failed}"
            )
        arrays, metrics = super().aggregate_train(server_round, usable)  # type: ignore[misc]
        if arrays is not None:  # Flower's mean turns integer buffers into floats: restore the global dtypes
            arrays = numpy_to_arrays(
                {
                    k: np.asarray(v).astype(self._global[k].dtype, copy=False)
                    for k, v in arrays_to_numpy(arrays).items()
                }
            )
        return arrays, metrics

    # --------------------------------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to every known site (training and held-out); only held-out sites are asked
        for Kaplan-Meier curves (the report draws theirs, so a training site never discloses them)."""
        config["server-round"] = server_round
        without_km = ConfigRecord({k: v for k, v in config.items() if k != messages.KM_GRID_KEY})
        return [
            Message(
                content=_record(self, arrays, without_km if node in self.train_nodes else config),
                message_type="evaluate",
                dst_node_id=node,
            )
            for node in _NodeView(grid, self.eval_nodes).get_node_ids()
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep every site's checked metrics in ``last_eval`` (failures, with reasons, in ``eval_failures``);
        return the event-weighted mean over sites."""
        self.last_eval, self.eval_failures = {}, {}
        for msg in replies:
            site = self._site(msg.metadata.src_node_id)
            error = messages.reply_error(msg)
            try:
                if error is not None:
                    raise ReplyError(f"client error: {error}")
                metrics = messages.check_eval_metrics(messages.reply_metrics(msg), self.declared.get(site))
            except ReplyError as reason:
                self.eval_failures[site] = messages.sanitize(str(reason))
                log.warning("round %d: evaluation on site %s failed: %s", server_round, site, reason)
                continue
            self.last_eval[site] = metrics
        if not self.last_eval:
            return None
        return MetricRecord(event_weighted_summary(self.last_eval.values()))

    # ------------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, np.ndarray]:
        """Server-optimizer state (FedOpt moments ``m_t``/``v_t``) as flat ``{"m_t/<key>": array}``."""
        state: dict[str, np.ndarray] = {}
        for name in ("m_t", "v_t"):
            for key, value in (getattr(self, name, None) or {}).items():
                state[f"{name}/{key}"] = np.asarray(value)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (a no-op for FedAvg/FedProx)."""
        for name in ("m_t", "v_t"):
            values = {k.split("/", 1)[1]: np.asarray(v) for k, v in state.items() if k.startswith(f"{name}/")}
            if values and not hasattr(self, name):
                raise FederationError(f"checkpoint holds {name} but strategy {type(self).__name__} has none")
            if hasattr(self, name):
                setattr(self, name, values or None)


def _record(strategy: Any, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
    return RecordDict({strategy.arrayrecord_key: arrays, strategy.configrecord_key: config})


def event_weighted_summary(site_metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Summaries over sites: C-index-like metrics weighted by events, the rest by examples.

    Parameters
    ----------
    site_metrics : iterable of mappings
        Per-site reply metrics with ``n-events`` and ``num-examples``.

    Returns
    -------
    dict
        ``{metric: weighted mean}`` over the sites where the metric is finite; NaN (with a logged reason)
        when no site has a finite value or the weights sum to 0.
    """
    rows = [dict(m) for m in site_metrics]
    keys = sorted({k for row in rows for k, v in row.items() if isinstance(v, int | float)})
    summary: dict[str, float] = {}
    for key in keys:
        if key in {"num-examples", "n-events"}:
            summary[key] = float(sum(row.get(key, 0) for row in rows))
            continue
        weight_key = "n-events" if ("c-index" in key or key == "auc") else "num-examples"
        pairs = [
            (float(row[key]), float(row.get(weight_key, 0)))
            for row in rows
            if isinstance(row.get(key), int | float) and math.isfinite(row[key])
        ]
        total = sum(w for _, w in pairs)
        if not pairs or total <= 0:
            log.info("summary of %r is NaN: no site has a finite value with positive %s", key, weight_key)
            summary[key] = math.nan
        else:
            summary[key] = sum(v * w for v, w in pairs) / total
    return summary


def _mixin_class(base: type[FedAvg]) -> type:
    return type(
        f"Heldout{base.__name__}", (HeldoutAwareMixin, base), {"__doc__": f"Held-out-aware {base.__name__}."}
    )


#: The held-out-aware subclass of every Flower strategy, by config name.
STRATEGY_CLASSES: dict[str, type] = {name: _mixin_class(cls) for name, cls in FLOWER_STRATEGIES.items()}


def build_strategy(
    strategy_cfg: Mapping[str, Any],
    *,
    weighting: str = "examples",
    min_train_sites: int = 1,
    max_update_norm: float | None = None,
    train_metrics_aggr_fn: Callable | None = None,
    weight_decay: float = 0.0,
) -> HeldoutAwareMixin:
    """Build the held-out-aware Flower strategy that ``strategy=<name>`` selects.

    Parameters
    ----------
    strategy_cfg : mapping
        ``configs/strategy/<name>.yaml``: ``name`` plus that strategy's constructor arguments.
    weighting : {"examples", "events"}
        Weight each client's update by its number of training cases or of events.
    min_train_sites : int
        A round needs at least this many usable training updates.
    max_update_norm : float or None
        Updates farther than this (L2) from the global model are rejected.
    weight_decay : float
        ``training.weight_decay``: the ridge term of ``newton``'s objective (the other strategies ignore it;
        their clients apply it).

    Returns
    -------
    HeldoutAwareMixin
        An instance of ``Heldout<FlowerClass>``.
    """
    cfg = dict(strategy_cfg)
    name = cfg.pop("name", None)
    if name in BASELINES:
        raise FederationError(
            f"strategy={name!r} is a baseline without Flower; run it with fedprog.baselines"
        )
    if name not in STRATEGY_CLASSES:
        raise FederationError(
            f"unknown strategy {name!r}; choose one of {sorted(STRATEGY_CLASSES) + list(BASELINES)}"
        )
    if weighting not in WEIGHT_KEYS:
        raise FederationError(f"weighting={weighting!r}; choose one of {sorted(WEIGHT_KEYS)}")
    if min_train_sites < 1:
        raise FederationError(f"min_train_sites={min_train_sites} must be >= 1")
    unknown = sorted(set(cfg) - set(_STRATEGY_ARGS[name]))
    if unknown:
        raise FederationError(
            f"strategy {name!r}: unknown key(s) {unknown}; known: {list(_STRATEGY_ARGS[name])}"
        )
    ridge = {"l2": float(weight_decay)} if name == "newton" else {}  # newton's objective, not a config key
    strategy = STRATEGY_CLASSES[name](
        min_train_nodes=min_train_sites,
        min_available_nodes=min_train_sites,
        min_evaluate_nodes=1,
        weighted_by_key=WEIGHT_KEYS[weighting],
        train_metrics_aggr_fn=train_metrics_aggr_fn,
        **cfg,
        **ridge,
    )
    strategy.min_train_sites = min_train_sites
    strategy.max_update_norm = None if max_update_norm is None else float(max_update_norm)
    strategy.set_sites({}, {})
    return strategy
