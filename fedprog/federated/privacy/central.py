"""Central DP: Flower's DP-FedAvg strategy wrappers with uniform weights and RDP accounting.

``central_dp``
    DP-FedAvg (McMahan et al. 2018) through Flower's strategy wrappers
    (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``). Each site's model update is
    clipped to an L2 norm ``C`` (on the server, or on the site by Flower's ``fixedclipping_mod`` /
    ``adaptiveclipping_mod``), the clipped updates are averaged **with uniform weights**, and Gaussian
    noise of std ``z * C / m`` is added to the mean (``z`` noise multiplier, ``m`` training sites). A
    Rényi-DP accountant (``flwr.serverapp.RdpAccountant``) composes one sampled-Gaussian release per round,
    so :func:`~fedprog.federated.privacy.accounting.privacy_spent` gives the site-level (epsilon, delta)
    spent so far.

:func:`wrap_strategy` is the server's entry point for both DP modes (``rounds.build_rounds``)::

    strategy = build_strategy(...)                                # Message-API FedAvg/FedProx/...
    if privacy.mode in ("central_dp", "local_dp"):
        strategy = wrap_strategy(strategy, cfg.privacy, num_train_sites)
    if privacy.mode == "secagg":
        final = run_secagg(grid, context, cfg.privacy, initial_arrays, num_rounds, train_node_ids,
                           train_config=..., evaluate_fn=...)
    else:
        result = strategy.start(grid, initial_arrays, num_rounds, ...)
    ... privacy_spent(strategy) after every round -> report (epsilon, delta)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
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
from omegaconf import DictConfig

from fedprog.federated.privacy.local import LocalDpStrategy
from fedprog.federated.privacy.settings import (
    KEY_NUM_EXAMPLES,
    PREFIX,
    CentralDpSettings,
    PrivacyConfigError,
    PrivacySettings,
    parse_privacy,
)

log = logging.getLogger(__name__)


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
