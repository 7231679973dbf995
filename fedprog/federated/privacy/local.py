"""Server side of local DP: the strategy wrapper that announces the settings and counts releases.

``local_dp``
    Each site clips its update and adds Gaussian noise itself before it leaves the hospital, with
    Flower's ``LocalDpMod(clipping_norm, sensitivity, epsilon, delta)`` (applied on the site by
    :func:`fedprog.federated.privacy.mods.privacy_mod`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedprog.federated.privacy.settings import PREFIX, PrivacyConfigError, PrivacySettings

log = logging.getLogger(__name__)


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
