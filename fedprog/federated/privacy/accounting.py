"""Privacy spent by a wrapped strategy, its checkpoint state, and the private RNG of the server's DP noise."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from fedprog.federated.privacy.central import ClientSideAdaptiveClippingDp, ServerSideAdaptiveClippingDp
from fedprog.federated.privacy.local import LocalDpStrategy
from fedprog.federated.privacy.settings import PREFIX, PrivacyConfigError

log = logging.getLogger(__name__)


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
