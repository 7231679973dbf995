"""Why a federation stops: raised by the strategies and the rounds, caught by the ServerApp."""

from __future__ import annotations


class FederationError(RuntimeError):
    """The federation cannot go on (too few sites, inconsistent replies); the message names the sites."""


class TooFewSitesError(FederationError):
    """Fewer than ``min_train_sites`` training sites sent a usable update in a round."""


class RunFailed(FederationError):
    """The run cannot give the results it promises (a site failed; see ``allow_partial``)."""


class SettingsError(ValueError):
    """A run config the sites or the server would refuse once running; one line naming the key."""
