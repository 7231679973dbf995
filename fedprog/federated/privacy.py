"""Privacy options for the federation: central DP with RDP accounting, local DP, and SecAgg+.

Three modes, chosen by the Hydra group ``privacy`` (``configs/privacy/*.yaml``, key ``privacy.mode``):

``central_dp``
    DP-FedAvg (McMahan et al. 2018) through Flower's strategy wrappers
    (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``). Each site's model update is
    clipped to an L2 norm ``C`` (on the server, or on the site by Flower's ``fixedclipping_mod`` /
    ``adaptiveclipping_mod``), the clipped updates are averaged **with uniform weights**, and Gaussian
    noise of std ``z * C / m`` is added to the mean (``z`` noise multiplier, ``m`` training sites). A
    Rényi-DP accountant (``flwr.serverapp.RdpAccountant``) composes one sampled-Gaussian release per round,
    so :func:`privacy_spent` gives the site-level (epsilon, delta) spent so far.
``local_dp``
    Each site clips its update and adds Gaussian noise itself before it leaves the hospital, with
    Flower's ``LocalDpMod(clipping_norm, sensitivity, epsilon, delta)``.
``secagg``
    SecAgg+ (Bell et al. 2020): the server only ever sees the sum of masked, quantised site models. Flower
    1.42 supports it only on the legacy path (``LegacyContext`` + ``DefaultWorkflow(fit_workflow=
    SecAggPlusWorkflow(...))`` on the server, ``secaggplus_mod`` around a ``NumPyClient`` on the site);
    :func:`run_secagg` and :func:`make_secagg_client_app` wrap that path.

How the one ServerApp / ClientApp pair uses this module
-------------------------------------------------------
Server (``server_app.py``)::

    strategy = build_strategy(...)                                # Message-API FedAvg/FedProx/...
    if privacy.mode in ("central_dp", "local_dp"):
        strategy = wrap_strategy(strategy, cfg.privacy, num_train_sites)
    if privacy.mode == "secagg":
        final = run_secagg(grid, context, cfg.privacy, initial_arrays, num_rounds, train_node_ids,
                           train_config=..., evaluate_fn=...)
    else:
        result = strategy.start(grid, initial_arrays, num_rounds, ...)
    ... privacy_spent(strategy) after every round -> report (epsilon, delta)

Client (``client_app.py``). The ``ClientApp`` is built at import time, before any config is known, so the
site side is driven by the *messages*: the wrapped strategy writes ``privacy.*`` keys into every train
``ConfigRecord``, and :func:`privacy_mod` reads them and applies the matching Flower mod to that train
message only. SecAgg+ messages are in the legacy record format; :func:`secagg_dispatch_mod` hands them to
the legacy ``ClientApp`` built by :func:`make_secagg_client_app` from the same engine-based train function::

    def train_arrays(arrays, config, context) -> tuple[ArrayRecord, MetricRecord]: ...  # engine.train
    secagg_app = make_secagg_client_app(train_arrays)
    app = ClientApp(mods=[secagg_dispatch_mod(secagg_app), privacy_mod])

A hospital can pin local DP for itself, whatever the server sends, with
``flower-supernode --node-config "privacy.mode='local_dp' privacy.local_dp.epsilon=0.5 ..."``: ``privacy.*``
keys in the node config override the message's. If the server runs another DP mode the site refuses the
round (an error reply naming the node-config key) rather than silently mixing mechanisms.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
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
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from omegaconf import DictConfig, OmegaConf

from fedprog.config import from_run_config, to_run_config

log = logging.getLogger(__name__)

MODES = ("none", "central_dp", "local_dp", "secagg")
CLIPPING_SIDES = ("server", "client")
PREFIX = "privacy"
# Keys the legacy SecAgg+ path adds to the fit config (FitIns configs only hold scalars, hence JSON); the
# site removes them again before calling the train function.
KEY_ARRAY_NAMES = "secagg-fit.array-names"
KEY_SECAGG_CLIPPING_RANGE = "secagg-fit.clipping-range"
KEY_SECAGG_MAX_WEIGHT = "secagg-fit.max-weight"
_SECAGG_FIT_KEYS = frozenset({KEY_ARRAY_NAMES, KEY_SECAGG_CLIPPING_RANGE, KEY_SECAGG_MAX_WEIGHT})
KEY_NUM_EXAMPLES = "num-examples"
KEY_SERVER_ROUND = "server-round"
# Record-name prefixes of the legacy (NumPyClient) message format.
_LEGACY_RECORD_PREFIXES = ("fitins.", "evaluateins.", "getparametersins", "getpropertiesins")
# Flower's SimpleClientManager default wait when no SecAgg+ timeout is configured (seconds).
_DEFAULT_NODE_WAIT_S = 86400

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]
TrainFn = Callable[[ArrayRecord, ConfigRecord, Context], tuple[ArrayRecord, MetricRecord]]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class PrivacyConfigError(ValueError):
    """A ``privacy.*`` setting is missing, unknown, or out of range; the message names the key."""


class SecAggError(RuntimeError):
    """SecAgg+ cannot run or aggregate correctly (site weight or parameter out of range, failed rounds)."""


# ----------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CentralDpSettings:
    """``privacy.central_dp``: DP-FedAvg with Flower's clipping wrappers (see ``configs/privacy``)."""

    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    clipping: str = "server"
    adaptive: bool = False
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None
    accounting: bool = True
    target_delta: float = 1e-5
    max_epsilon: float | None = None


@dataclass(frozen=True)
class LocalDpSettings:
    """``privacy.local_dp``: arguments of Flower's ``LocalDpMod``."""

    clipping_norm: float = 1.0
    sensitivity: float = 1.0
    epsilon: float = 1.0
    delta: float = 1e-5


@dataclass(frozen=True)
class SecAggSettings:
    """``privacy.secagg``: arguments of Flower's ``SecAggPlusWorkflow`` plus run controls."""

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.7
    max_weight: float = 1000.0
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    modulus_range: int = 4294967296
    timeout: float | None = None
    min_nodes: int = 2
    strict: bool = True


@dataclass(frozen=True)
class PrivacySettings:
    """Validated ``privacy`` config: the mode and the settings of that mode (``None`` for the others)."""

    mode: str = "none"
    central_dp: CentralDpSettings | None = None
    local_dp: LocalDpSettings | None = None
    secagg: SecAggSettings | None = None

    def to_config(self) -> dict[str, Any]:
        """Return the nested ``privacy`` mapping of this mode (the inverse of :func:`parse_privacy`)."""
        section = getattr(self, self.mode, None)
        return {"mode": self.mode, **({self.mode: asdict(section)} if section is not None else {})}

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flatten to ``privacy.*`` scalar keys for a Flower ``ConfigRecord`` (``None`` as ``json:null``)."""
        return to_run_config({PREFIX: self.to_config()})


_SECTIONS: dict[str, type] = {
    "central_dp": CentralDpSettings,
    "local_dp": LocalDpSettings,
    "secagg": SecAggSettings,
}


def _as_mapping(cfg: DictConfig | Mapping[str, Any] | PrivacySettings | None) -> dict[str, Any]:
    if cfg is None:
        return {"mode": "none"}
    if isinstance(cfg, PrivacySettings):
        return cfg.to_config()
    if isinstance(cfg, DictConfig):
        return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    return dict(cfg)


def _number(key: str, value: Any, *, integer: bool = False, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        expected = "an integer" if integer else "a finite number"
        raise PrivacyConfigError(f"{key}: expected {expected}{' or null' if optional else ''}, got {value!r}")
    return value if integer else float(value)


def _check(key: str, ok: bool, expected: str, value: Any) -> None:
    if not ok:
        raise PrivacyConfigError(f"{key}: expected {expected}, got {value!r}")


def _section(mode: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check the keys of one section against its dataclass and fill the documented defaults."""
    cls = _SECTIONS[mode]
    known = {f.name: f for f in fields(cls)}
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PrivacyConfigError(
            f"{PREFIX}.{mode}.{unknown[0]}: unknown key (known keys of {PREFIX}.{mode}: {sorted(known)})"
        )
    return {name: raw.get(name, f.default) for name, f in known.items()}


def _parse_central(values: dict[str, Any]) -> CentralDpSettings:
    k = f"{PREFIX}.central_dp."
    z = _number(k + "noise_multiplier", values["noise_multiplier"])
    norm = _number(k + "clipping_norm", values["clipping_norm"])
    quantile = _number(k + "target_clipped_quantile", values["target_clipped_quantile"])
    lr = _number(k + "clip_norm_lr", values["clip_norm_lr"])
    count_std = _number(k + "clipped_count_stddev", values["clipped_count_stddev"], optional=True)
    delta = _number(k + "target_delta", values["target_delta"])
    max_eps = _number(k + "max_epsilon", values["max_epsilon"], optional=True)
    _check(k + "noise_multiplier", z >= 0, ">= 0", z)
    _check(k + "clipping_norm", norm > 0, "> 0", norm)
    _check(
        k + "clipping", values["clipping"] in CLIPPING_SIDES, f"one of {CLIPPING_SIDES}", values["clipping"]
    )
    for name in ("adaptive", "accounting"):
        _check(k + name, isinstance(values[name], bool), "true or false", values[name])
    _check(k + "target_clipped_quantile", 0 <= quantile <= 1, "a value in [0, 1]", quantile)
    _check(k + "clip_norm_lr", lr > 0, "> 0", lr)
    _check(k + "clipped_count_stddev", count_std is None or count_std >= 0, ">= 0 or null", count_std)
    _check(k + "target_delta", 0 < delta < 1, "a value in (0, 1)", delta)
    _check(k + "max_epsilon", max_eps is None or max_eps > 0, "> 0 or null", max_eps)
    _check(k + "noise_multiplier", z > 0 or not values["accounting"], "> 0 when accounting is on", z)
    return CentralDpSettings(
        noise_multiplier=z,
        clipping_norm=norm,
        clipping=values["clipping"],
        adaptive=values["adaptive"],
        target_clipped_quantile=quantile,
        clip_norm_lr=lr,
        clipped_count_stddev=count_std,
        accounting=values["accounting"],
        target_delta=delta,
        max_epsilon=max_eps,
    )


def _parse_local(values: dict[str, Any]) -> LocalDpSettings:
    k = f"{PREFIX}.local_dp."
    parsed = {name: _number(k + name, values[name]) for name in values}
    _check(k + "clipping_norm", parsed["clipping_norm"] > 0, "> 0", parsed["clipping_norm"])
    _check(k + "sensitivity", parsed["sensitivity"] > 0, "> 0", parsed["sensitivity"])
    _check(k + "epsilon", parsed["epsilon"] > 0, "> 0", parsed["epsilon"])
    _check(k + "delta", 0 < parsed["delta"] < 1, "a value in (0, 1)", parsed["delta"])
    return LocalDpSettings(**parsed)


def _parse_share(key: str, value: Any, int_minimum: int) -> int | float:
    if isinstance(value, int) and not isinstance(value, bool):
        _check(key, value >= int_minimum, f"an integer >= {int_minimum} or a fraction in (0, 1]", value)
        return value
    fraction = _number(key, value)
    _check(key, 0 < fraction <= 1, f"an integer >= {int_minimum} or a fraction in (0, 1]", value)
    return fraction


def _parse_secagg(values: dict[str, Any]) -> SecAggSettings:
    k = f"{PREFIX}.secagg."
    shares = _parse_share(k + "num_shares", values["num_shares"], 3)
    threshold = _parse_share(k + "reconstruction_threshold", values["reconstruction_threshold"], 2)
    if isinstance(shares, int) and isinstance(threshold, int):
        _check(k + "reconstruction_threshold", threshold < shares, f"< num_shares ({shares})", threshold)
    max_weight = _number(k + "max_weight", values["max_weight"])
    clip = _number(k + "clipping_range", values["clipping_range"])
    q_range = _number(k + "quantization_range", values["quantization_range"], integer=True)
    m_range = _number(k + "modulus_range", values["modulus_range"], integer=True)
    timeout = _number(k + "timeout", values["timeout"], optional=True)
    min_nodes = _number(k + "min_nodes", values["min_nodes"], integer=True)
    _check(k + "max_weight", max_weight > 0, "> 0", max_weight)
    _check(k + "clipping_range", clip > 0, "> 0", clip)
    _check(k + "quantization_range", q_range > 0, "> 0", q_range)
    _check(k + "modulus_range", m_range > q_range and m_range & (m_range - 1) == 0,
           f"a power of 2 larger than quantization_range ({q_range})", m_range)  # fmt: skip
    _check(k + "modulus_range", m_range <= 2**32, "<= 2**32 (Flower masks with uint32)", m_range)
    _check(k + "timeout", timeout is None or timeout > 0, "> 0 or null", timeout)
    _check(k + "min_nodes", min_nodes >= 2, ">= 2 (SecAgg+ needs two sites)", min_nodes)
    _check(k + "strict", isinstance(values["strict"], bool), "true or false", values["strict"])
    return SecAggSettings(
        num_shares=shares,
        reconstruction_threshold=threshold,
        max_weight=max_weight,
        clipping_range=clip,
        quantization_range=q_range,
        modulus_range=m_range,
        timeout=timeout,
        min_nodes=min_nodes,
        strict=values["strict"],
    )


def parse_privacy(cfg: DictConfig | Mapping[str, Any] | PrivacySettings | None) -> PrivacySettings:
    """Validate the ``privacy`` config group and return typed settings.

    Parameters
    ----------
    cfg : DictConfig or Mapping or PrivacySettings or None
        ``cfg.privacy``: ``mode`` plus the section of that mode (``central_dp``, ``local_dp`` or ``secagg``).
        Missing keys take the defaults documented in ``configs/privacy/<mode>.yaml``; ``None`` means no
        privacy mechanism.

    Returns
    -------
    PrivacySettings
        The mode and its validated section.

    Raises
    ------
    PrivacyConfigError
        A key is unknown, has the wrong type or is out of range; the message starts with the dotted key,
        e.g. ``privacy.central_dp.noise_multiplier: expected >= 0, got -1.0``.
    """
    if isinstance(cfg, PrivacySettings):
        return cfg
    raw = _as_mapping(cfg)
    allowed = {"mode", *_SECTIONS}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise PrivacyConfigError(f"{PREFIX}.{unknown[0]}: unknown key (known keys: {sorted(allowed)})")
    mode = raw.get("mode", "none")
    _check(f"{PREFIX}.mode", mode in MODES, f"one of {MODES}", mode)
    if mode == "none":
        return PrivacySettings()
    values = _section(mode, raw.get(mode))
    parser = {"central_dp": _parse_central, "local_dp": _parse_local, "secagg": _parse_secagg}[mode]
    return PrivacySettings(mode=mode, **{mode: parser(values)})


# ----------------------------------------------------------------------------------------------------------
# Server side: central DP and local DP strategy wrappers
# ----------------------------------------------------------------------------------------------------------


def _uniform_weights(replies: list[Message], weight_key: str) -> list[Message]:
    """Set every valid reply's aggregation weight to 1, so FedAvg takes the uniform mean DP-FedAvg assumes.

    The Gaussian noise std ``z * C / m`` is calibrated to the sensitivity ``C / m`` of a *uniform* mean of
    ``m`` clipped updates; an example-weighted mean has sensitivity ``C * max_i w_i / sum(w)``, larger than
    ``C / m`` whenever sites differ in size, and would be under-noised.
    """
    out = []
    for reply in replies:
        if reply.has_error():
            out.append(reply)
            continue
        content = RecordDict(dict(reply.content.items()))  # copies: the caller's replies keep their weights
        for name, record in reply.content.metric_records.items():
            if weight_key in record:
                content[name] = MetricRecord({**dict(record.items()), weight_key: 1})
        out.append(Message(content=content, metadata=reply.metadata))
    return out


class _DpWrapperMixin:
    """fedprog behaviour shared by the four central-DP wrappers (mixed in before the Flower class).

    * announces the privacy settings in every train ``ConfigRecord`` (read by :func:`privacy_mod`);
    * gives every site weight 1 (see :func:`_uniform_weights`);
    * accounts: one Gaussian release with noise multiplier ``z`` per aggregated round, composed in an
      ``RdpAccountant`` (``privacy_accountant``). Flower 1.42 accounts only the fixed-clipping wrappers and
      only around a strategy that does not override ``aggregate_train``; fedprog's held-out-aware strategies
      screen replies before FedAvg's mean, so the accounting is done here, the same way, for all four.
      For adaptive clipping ``z`` is the noise multiplier of the joint release of mean and clipped count
      (Andrew et al. 2021): Flower splits it into ``(z**-2 - (2 * clipped_count_stddev)**-2)**-0.5`` for the
      update and ``clipped_count_stddev`` for the count.
    * skips a round, with an error, when a site returns the global model unchanged: Flower 1.42's server-side
      clipping divides by the update norm.
    """

    _announce: Mapping[str, bool | int | float | str] = MappingProxyType({})
    _weight_key: str = KEY_NUM_EXAMPLES
    _accounted_z: float = math.nan
    privacy_accountant: Any = None
    num_sampled_clients: int

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Announce the settings; refuse the round when its release would exceed ``max_epsilon``."""
        config.update(self._announce)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        accountant = self.privacy_accountant
        if accountant is None or not messages:
            return messages
        if len(messages) != self.num_sampled_clients:
            raise PrivacyConfigError(
                f"num_train_sites: the strategy sampled {len(messages)} sites in round {server_round}, "
                f"but the noise and the accountant are set up for {self.num_sampled_clients}"
            )
        event = self._event(len(messages))
        if accountant.config.max_epsilon is not None and accountant.would_exceed(event):
            spent = accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(
                f"round {server_round}: the next release would exceed privacy.central_dp.max_epsilon="
                f"{accountant.config.max_epsilon} (spent: epsilon={spent.epsilon:.4g}, delta={spent.delta:g})"
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip, average uniformly and add noise (Flower's wrapper); compose the round's release."""
        replies_list = _uniform_weights(list(replies), self._weight_key)
        valid = [reply for reply in replies_list if not reply.has_error()]
        if self.privacy_accountant is not None and len(valid) != self.num_sampled_clients:
            log.warning(
                "round %d: %d of %d sites replied without error; the noise is calibrated for %d, so the "
                "round is skipped to keep the accounted guarantee",
                server_round, len(valid), self.num_sampled_clients, self.num_sampled_clients,
            )  # fmt: skip
            return None, None
        current = getattr(self, "current_arrays", None)  # set by the server-side wrappers only
        unchanged = _unchanged_nodes(valid, current) if current is not None else []
        if unchanged:
            log.error(
                "round %d: node(s) %s returned the global model unchanged (zero update); Flower's central-DP "
                "clipping cannot handle it, so the round is skipped",
                server_round, unchanged,
            )  # fmt: skip
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies_list)  # type: ignore[misc]
        if arrays is not None and self.privacy_accountant is not None:
            self.privacy_accountant.compose(self._event(len(valid)))
            spent = self.privacy_accountant.get_privacy_spent()
            log.info(
                "round %d: privacy spent epsilon=%.4g at delta=%g", server_round, spent.epsilon, spent.delta
            )
        return arrays, metrics

    def _event(self, sample_size: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(
            noise_multiplier=self._accounted_z,
            sample_size=sample_size,
            population_size=self.privacy_accountant.config.population_size,
        )

    def privacy_spent(self) -> Any:
        """Return Flower's ``PrivacySpent`` so far, or ``None`` without an accountant."""
        return None if self.privacy_accountant is None else self.privacy_accountant.get_privacy_spent()


def _unchanged_nodes(replies: list[Message], current: ArrayRecord) -> list[int]:
    reference = current.to_numpy_ndarrays()
    nodes = []
    for reply in replies:
        for record in reply.content.array_records.values():
            new = record.to_numpy_ndarrays()
            if len(new) == len(reference) and all(
                np.array_equal(a, b) for a, b in zip(new, reference, strict=True)
            ):
                nodes.append(reply.metadata.src_node_id)
    return nodes


class ServerSideFixedClippingDp(_DpWrapperMixin, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper with uniform weights, announced settings, accounting."""


class ClientSideFixedClippingDp(_DpWrapperMixin, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper (sites run ``fixedclipping_mod``, see privacy_mod)."""


class ServerSideAdaptiveClippingDp(_DpWrapperMixin, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive-clipping DP wrapper with uniform weights and RDP accounting."""


class ClientSideAdaptiveClippingDp(_DpWrapperMixin, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive-clipping DP wrapper (sites run ``adaptiveclipping_mod``)."""


class LocalDpStrategy(Strategy):
    """Delegating strategy that announces the local-DP settings to the sites and counts releases.

    The noise itself is added on each site by ``LocalDpMod`` (through :func:`privacy_mod`); this wrapper
    only writes ``privacy.*`` keys into every train ``ConfigRecord`` and counts the rounds in which the
    sites released an update, for :func:`privacy_spent`.
    """

    def __init__(self, strategy: Strategy, settings: PrivacySettings) -> None:
        super().__init__()
        if settings.local_dp is None:
            raise PrivacyConfigError(
                f"{PREFIX}.mode: LocalDpStrategy needs mode local_dp, got {settings.mode!r}"
            )
        self.strategy = strategy
        self.settings = settings.local_dp
        self.num_releases = 0
        self._announce = settings.to_flat()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add the local-DP keys to the train config and configure with the wrapped strategy."""
        config.update(self._announce)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the wrapped strategy; count the round as one release if any site replied."""
        replies_list = list(replies)
        if any(not reply.has_error() for reply in replies_list):
            self.num_releases += 1
        return self.strategy.aggregate_train(server_round, replies_list)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure evaluation with the wrapped strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Aggregate evaluation with the wrapped strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the local-DP settings and the wrapped strategy's summary."""
        log.info("local DP on every site: %s", self.settings)
        self.strategy.summary()


def _uses_fedavg_aggregation(strategy: Strategy) -> bool:
    """True when the first Flower class in the MRO that defines ``aggregate_train`` is FedAvg.

    fedprog subclasses (e.g. the held-out-aware strategies) may screen replies and restore dtypes around
    it, but the aggregate must be FedAvg's mean, not a FedOpt step, a median or Krum.
    """
    if not isinstance(strategy, FedAvg):
        return False
    for cls in type(strategy).__mro__:
        if cls.__module__.startswith("flwr.") and "aggregate_train" in vars(cls):
            return cls is FedAvg
    return False


def make_accountant(settings: CentralDpSettings, num_train_sites: int) -> Any:
    """Build the RDP accountant of central DP: every training site takes part in every round.

    Parameters
    ----------
    settings : CentralDpSettings
        ``target_delta`` and ``max_epsilon`` are used.
    num_train_sites : int
        Population size (the sites that train); no sampling amplification is claimed, since all sites
        train in every round (``SamplingMethod.NO_AMPLIFICATION``, add-or-remove-one site neighbours).

    Returns
    -------
    flwr.serverapp.RdpAccountant
    """
    from flwr.serverapp import RdpAccountant  # lazy export of Flower; needs flwr[dp] (dp-accounting)

    config = PrivacyConfig(
        target_delta=settings.target_delta,
        population_size=num_train_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=settings.max_epsilon,
    )
    return RdpAccountant(config)


def wrap_strategy(
    strategy: Strategy, privacy_cfg: DictConfig | Mapping[str, Any] | PrivacySettings, num_train_sites: int
) -> Strategy:
    """Wrap a Message-API strategy with the configured privacy mechanism.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The federation strategy (``FedAvg``, ``FedProx``, fedprog's held-out-aware subclasses, ...).
        Central DP with accounting needs an aggregate that is FedAvg's mean of the clipped site models (the
        noise is added to it): FedAvg, FedProx and subclasses that screen replies around FedAvg's
        ``aggregate_train``; not FedAdam/FedYogi/FedAdagrad (a server optimiser step).
    privacy_cfg : DictConfig or Mapping or PrivacySettings
        ``cfg.privacy``.
    num_train_sites : int
        Number of sites that train in every round (held-out sites excluded); the noise std is
        ``noise_multiplier * clipping_norm / num_train_sites``.

    Returns
    -------
    Strategy
        ``strategy`` itself for ``mode=none``; for ``central_dp`` one of the four Flower DP wrappers,
        subclassed to use uniform weights, announce the settings to the sites and account (see
        ``_DpWrapperMixin``); a :class:`LocalDpStrategy` for ``local_dp``.

    Raises
    ------
    PrivacyConfigError
        Bad settings, ``mode=secagg`` (use :func:`run_secagg`), or accounting with a strategy whose
        aggregate is not FedAvg's.
    """
    settings = parse_privacy(privacy_cfg)
    if isinstance(num_train_sites, bool) or not isinstance(num_train_sites, int) or num_train_sites < 1:
        raise PrivacyConfigError(f"num_train_sites: expected a positive integer, got {num_train_sites!r}")
    if settings.mode == "none":
        return strategy
    if settings.mode == "secagg":
        raise PrivacyConfigError(
            f"{PREFIX}.mode=secagg runs on Flower's legacy workflow, not through a Message-API strategy: "
            "call fedprog.federated.privacy.run_secagg from the ServerApp instead of wrap_strategy"
        )
    if settings.mode == "local_dp":
        return LocalDpStrategy(strategy, settings)
    dp = cast(CentralDpSettings, settings.central_dp)
    name = type(strategy).__name__
    if not _uses_fedavg_aggregation(strategy):
        if dp.accounting:
            raise PrivacyConfigError(
                f"{PREFIX}.central_dp.accounting=true needs a strategy that aggregates with FedAvg's "
                f"aggregate_train (fedavg, fedprox); {name} aggregates differently, so the noise would not "
                "be calibrated to its output. Use strategy=fedavg or set privacy.central_dp.accounting=false"
            )
        log.warning("central DP on %s: noise is added to its aggregate, which is not a plain mean", name)
    if dp.adaptive:
        _check_adaptive_noise(dp, num_train_sites)
        cls = ServerSideAdaptiveClippingDp if dp.clipping == "server" else ClientSideAdaptiveClippingDp
        wrapped: Any = cls(
            strategy,
            dp.noise_multiplier,
            num_train_sites,
            initial_clipping_norm=dp.clipping_norm,
            target_clipped_quantile=dp.target_clipped_quantile,
            clip_norm_lr=dp.clip_norm_lr,
            clipped_count_stddev=dp.clipped_count_stddev,
        )
    else:
        cls = ServerSideFixedClippingDp if dp.clipping == "server" else ClientSideFixedClippingDp
        wrapped = cls(strategy, dp.noise_multiplier, dp.clipping_norm, num_train_sites)
    wrapped.privacy_accountant = make_accountant(dp, num_train_sites) if dp.accounting else None
    wrapped._accounted_z = dp.noise_multiplier
    wrapped._announce = settings.to_flat()
    wrapped._weight_key = getattr(strategy, "weighted_by_key", KEY_NUM_EXAMPLES)
    log.info(
        "central DP: %s around %s, %d training sites, %s", type(wrapped).__name__, name, num_train_sites, dp
    )
    return cast(Strategy, wrapped)


def _check_adaptive_noise(dp: CentralDpSettings, num_train_sites: int) -> None:
    """Reject ``z >= 2 * clipped_count_stddev``: Flower would leave no noise budget for the update."""
    count_std = dp.clipped_count_stddev if dp.clipped_count_stddev is not None else num_train_sites / 20
    if dp.noise_multiplier > 0 and dp.noise_multiplier >= 2 * count_std:
        raise PrivacyConfigError(
            f"{PREFIX}.central_dp.clipped_count_stddev: adaptive clipping needs noise_multiplier "
            f"({dp.noise_multiplier}) < 2 * clipped_count_stddev ({count_std:g}"
            f"{', the default num_train_sites / 20' if dp.clipped_count_stddev is None else ''}); "
            f"set it above {dp.noise_multiplier / 2:g}"
        )


def privacy_spent(strategy: Strategy) -> dict[str, float]:
    """Return the privacy spent so far by a strategy from :func:`wrap_strategy`, for the round report.

    Parameters
    ----------
    strategy : Strategy
        The (possibly wrapped) strategy, after any number of rounds.

    Returns
    -------
    dict
        ``epsilon`` and ``delta`` (float) and ``releases`` (float count of private releases). Central DP
        with accounting: RDP epsilon at ``target_delta`` (site-level, add-or-remove-one site). Local DP:
        basic composition of the per-release guarantee of every site, ``(k * epsilon, k * delta)`` after
        ``k`` releases. Otherwise (no DP, SecAgg+, central DP without accounting) both are NaN: there is
        no DP guarantee to report (the reason is logged at DEBUG).
    """
    accountant = getattr(strategy, "privacy_accountant", None) or getattr(strategy, "accountant", None)
    if accountant is not None:
        spent = accountant.get_privacy_spent()
        return {
            "epsilon": float(spent.epsilon),
            "delta": float(spent.delta),
            "releases": float(spent.num_releases),
        }
    if isinstance(strategy, LocalDpStrategy):
        k = strategy.num_releases
        return {
            "epsilon": k * strategy.settings.epsilon,
            "delta": min(1.0, k * strategy.settings.delta),
            "releases": float(k),
        }
    log.debug("privacy_spent: %s has no privacy accountant; reporting NaN", type(strategy).__name__)
    return {"epsilon": math.nan, "delta": math.nan, "releases": math.nan}


class NoiseRng:
    """A private NumPy RNG stream for the server's DP noise, swapped into ``np.random`` around aggregation.

    Flower's DP wrappers draw their Gaussian noise from NumPy's global RNG. Anything else in the server
    process (a seeded library, an in-process client) can reset or advance that RNG, which would make the noise
    predictable from the run's public seed or make a resumed run draw different noise. This stream is seeded
    from OS entropy (never from the config's seed), is used only inside :meth:`active`, and its state is saved
    in the checkpoint (server-private), so a resumed run draws exactly the noise the uninterrupted run drew.

    Parameters
    ----------
    state : mapping, optional
        A :meth:`state_dict` to continue; a fresh entropy-seeded stream when None.
    """

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        if state is None:
            self._state = np.random.RandomState(np.random.SeedSequence().generate_state(4)).get_state()
        else:
            name, keys, pos, has_gauss, cached = state["mt19937"]
            self._state = (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, ``np.random`` draws from this stream; the global state is restored after."""
        saved = np.random.get_state()
        np.random.set_state(self._state)
        try:
            yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(saved)

    def state_dict(self) -> dict[str, Any]:
        """JSON-compatible state (for the checkpoint; the noise is only as secret as this file)."""
        name, keys, pos, has_gauss, cached = self._state
        return {"mt19937": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]}


def privacy_state(strategy: Strategy) -> dict[str, Any]:
    """JSON-compatible privacy state of a wrapped strategy, for checkpoints (empty without DP).

    Returns
    -------
    dict
        ``accountant`` (the RDP accountant's ``state_dict``: every composed release), ``num_releases`` (local
        DP) and ``clipping_norm`` (adaptive clipping moves it every round), each only when it applies.
    """
    state: dict[str, Any] = {}
    accountant = getattr(strategy, "privacy_accountant", None)
    if accountant is not None:
        state["accountant"] = accountant.state_dict()
    if isinstance(strategy, LocalDpStrategy):
        state["num_releases"] = int(strategy.num_releases)
    if isinstance(strategy, ServerSideAdaptiveClippingDp | ClientSideAdaptiveClippingDp):
        state["clipping_norm"] = float(strategy.clipping_norm)
    return state


def load_privacy_state(strategy: Strategy, state: Mapping[str, Any]) -> None:
    """Restore what :func:`privacy_state` returned into a strategy wrapped with the same settings.

    Raises
    ------
    PrivacyConfigError
        The checkpoint holds accountant state but the strategy has no accountant (or the reverse), or the
        accountant configurations differ.
    """
    accountant = getattr(strategy, "privacy_accountant", None)
    if ("accountant" in state) != (accountant is not None):
        raise PrivacyConfigError(
            f"{PREFIX}.central_dp.accounting: the checkpoint {'holds' if 'accountant' in state else 'lacks'} "
            f"privacy-accountant state but the resumed strategy {type(strategy).__name__} "
            f"{'has none' if accountant is None else 'has one'}"
        )
    if accountant is not None:
        try:
            accountant.load_state_dict(dict(state["accountant"]))
        except ValueError as error:
            raise PrivacyConfigError(
                f"{PREFIX}.central_dp: cannot restore the accountant: {error}"
            ) from error
    if "num_releases" in state and isinstance(strategy, LocalDpStrategy):
        strategy.num_releases = int(state["num_releases"])
    if "clipping_norm" in state and hasattr(strategy, "clipping_norm"):
        strategy.clipping_norm = float(state["clipping_norm"])


# ----------------------------------------------------------------------------------------------------------
# Client side: mods
# ----------------------------------------------------------------------------------------------------------


def _train_only(mod: Mod) -> Mod:
    """Apply ``mod`` to train messages only (Flower's DP mods reject evaluate replies without arrays)."""

    def wrapped(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, context)
        return mod(msg, context, call_next)

    wrapped.__name__ = f"train_only_{getattr(mod, '__name__', type(mod).__name__)}"
    return wrapped


def client_mods(privacy_cfg: DictConfig | Mapping[str, Any] | PrivacySettings) -> list[Mod]:
    """Return the Flower mods a site needs for a known privacy config.

    Parameters
    ----------
    privacy_cfg : DictConfig or Mapping or PrivacySettings
        ``cfg.privacy``.

    Returns
    -------
    list
        ``[]`` for ``none`` and server-side central DP; ``[fixedclipping_mod]`` or ``[adaptiveclipping_mod]``
        for client-side central DP; ``[LocalDpMod(...)]`` for local DP (all restricted to train messages,
        so they are safe as app-wide mods); ``[secaggplus_mod]`` for SecAgg+ (for the legacy ClientApp only,
        see :func:`make_secagg_client_app`). The Message-API ClientApp, built before the config is known,
        uses :func:`privacy_mod`, which calls this with the settings announced in each message.
    """
    settings = parse_privacy(privacy_cfg)
    if settings.mode == "local_dp":
        ldp = cast(LocalDpSettings, settings.local_dp)
        return [_train_only(LocalDpMod(ldp.clipping_norm, ldp.sensitivity, ldp.epsilon, ldp.delta))]
    if settings.mode == "central_dp":
        dp = cast(CentralDpSettings, settings.central_dp)
        if dp.clipping == "client":
            return [_train_only(adaptiveclipping_mod if dp.adaptive else fixedclipping_mod)]
        return []
    if settings.mode == "secagg":
        return [secaggplus_mod]
    return []


def _privacy_keys(source: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in source.items() if key.startswith(PREFIX + ".")}


def message_privacy(msg: Message, context: Context) -> PrivacySettings | None:
    """Return the privacy settings in force for one train message on this site, or ``None``.

    The settings announced by the server (``privacy.*`` keys in the message's ``ConfigRecord``) are
    overridden by ``privacy.*`` keys of the site's ``node_config``.

    Raises
    ------
    PrivacyConfigError
        The announced or node settings are invalid, or the site's ``privacy.mode`` contradicts the
        server's (e.g. the site demands local DP while the server runs central DP).
    """
    announced: dict[str, Any] = {}
    for record in msg.content.config_records.values():
        announced.update(_privacy_keys(record))
    pinned = _privacy_keys(context.node_config)
    if not announced and not pinned:
        return None
    server_mode = from_run_config(announced).get(PREFIX, {}).get("mode") if announced else None
    site_mode = pinned.get(f"{PREFIX}.mode")
    if site_mode not in (None, "local_dp"):
        raise PrivacyConfigError(
            f"node_config {PREFIX}.mode={site_mode!r} of node {context.node_id}: a site can only pin "
            "local_dp (the other mechanisms need the server's cooperation)"
        )
    if site_mode is not None and server_mode not in (None, site_mode):
        raise PrivacyConfigError(
            f"node_config {PREFIX}.mode={site_mode!r} of node {context.node_id} contradicts the server's "
            f"{PREFIX}.mode={server_mode!r}; this site refuses to train under another privacy mechanism"
        )
    if site_mode is not None and site_mode != server_mode:
        announced = {}  # the site's own mode; ignore leftovers of the server's announcement
    tree = from_run_config({**announced, **pinned})
    return parse_privacy(OmegaConf.to_container(tree.get(PREFIX, OmegaConf.create({"mode": "none"}))))


def privacy_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower mod for the Message-API ClientApp: apply the privacy mods announced in each train message.

    Attach once, at construction: ``ClientApp(mods=[privacy_mod])``. For a train message it reads the
    settings with :func:`message_privacy` and runs the message through :func:`client_mods` of them
    (``LocalDpMod`` for local DP, Flower's fixed/adaptive clipping mod for client-side central DP); other
    messages, and train messages without privacy settings, pass through unchanged.
    """
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    settings = message_privacy(msg, context)
    if settings is None or settings.mode in ("none", "secagg"):
        return call_next(msg, context)
    chain = call_next
    for mod in reversed(client_mods(settings)):
        chain = _bind(mod, chain)
    return chain(msg, context)


def _bind(
    mod: Mod, call_next: Callable[[Message, Context], Message]
) -> Callable[[Message, Context], Message]:
    return lambda msg, context: mod(msg, context, call_next)


# ----------------------------------------------------------------------------------------------------------
# SecAgg+: legacy client
# ----------------------------------------------------------------------------------------------------------


def is_legacy_message(msg: Message) -> bool:
    """True for messages in the legacy NumPyClient format, including the SecAgg+ protocol stages."""
    return any(key == RECORD_KEY_CONFIGS or key.startswith(_LEGACY_RECORD_PREFIXES) for key in msg.content)


def secagg_dispatch_mod(legacy_app: ClientApp) -> Mod:
    """Return a mod that hands legacy-format messages (SecAgg+ rounds) to ``legacy_app``.

    Put it first in the Message-API ClientApp's mods: ``ClientApp(mods=[secagg_dispatch_mod(secagg_app),
    privacy_mod])``. SecAgg+ stage and fit messages arrive as ``train`` messages in the legacy record format;
    they are answered by the legacy app (``secaggplus_mod`` + :class:`SecAggNumPyClient`), everything else
    goes on to the Message-API handlers.
    """

    def secagg_dispatch(
        msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        if is_legacy_message(msg):
            return legacy_app(msg, context)
        return call_next(msg, context)

    return secagg_dispatch


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
# SecAgg+: legacy server
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
    if not isinstance(cfg, PrivacySettings) and PREFIX in cfg:
        cfg = cast(Any, cfg)[PREFIX]
    settings = parse_privacy(cfg)
    if settings.mode != "secagg" or settings.secagg is None:
        raise PrivacyConfigError(f"{PREFIX}.mode: run_secagg needs mode secagg, got {settings.mode!r}")
    sa = settings.secagg
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise PrivacyConfigError(f"num_rounds: expected a positive integer, got {num_rounds!r}")
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
    workflow = DefaultWorkflow(
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
    log.info("SecAgg+: %d rounds, %s", num_rounds, sa)
    workflow(grid, legacy)
    failed = sorted(set(range(1, num_rounds + 1)) - strategy.aggregated_rounds)
    if failed:
        message = f"SecAgg+ produced no aggregate in round(s) {failed}; the model was not updated there"
        if sa.strict:
            raise SecAggError(message + f" (set {PREFIX}.secagg.strict=false to continue anyway)")
        log.error(message)
    final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    return _named(final, strategy.names, strategy.dtypes)
