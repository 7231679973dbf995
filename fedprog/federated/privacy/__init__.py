"""Privacy options for the federation: central DP with RDP accounting, local DP, and SecAgg+.

Three modes, chosen by the Hydra group ``privacy`` (``configs/privacy/*.yaml``, key ``privacy.mode``):
``central_dp`` (DP-FedAvg through Flower's clipping wrappers, with a Rényi-DP accountant), ``local_dp``
(each site adds noise itself with Flower's ``LocalDpMod``) and ``secagg`` (SecAgg+ on Flower's legacy
workflow). The server wraps its strategy with :func:`wrap_strategy` (or calls :func:`run_secagg_rounds`) and
reports :func:`privacy_spent` every round; the ClientApp applies :func:`privacy_mod` and
:func:`secagg_dispatch_mod`, driven by the ``privacy.*`` keys announced in each train message.

Modules, one job each:

* :mod:`.settings`: config dataclasses, :func:`parse_privacy`, the error classes;
* :mod:`.central`: the central-DP strategy wrappers, the RDP accountant, :func:`wrap_strategy`;
* :mod:`.local`: :class:`LocalDpStrategy`, the server side of local DP;
* :mod:`.accounting`: :func:`privacy_spent`, checkpoint state, :class:`NoiseRng`;
* :mod:`.mods`: the site's Flower mods (:func:`privacy_mod`, :func:`secagg_dispatch_mod`);
* :mod:`.secagg`: the SecAgg+ legacy client app, :func:`run_secagg` and the federation's
  :func:`run_secagg_rounds`.

Every public name is re-exported here, so ``from fedprog.federated.privacy import X`` keeps working.
"""

from __future__ import annotations

from fedprog.config import from_run_config, to_run_config
from fedprog.federated.privacy.accounting import NoiseRng, load_privacy_state, privacy_spent, privacy_state
from fedprog.federated.privacy.central import (
    ClientSideAdaptiveClippingDp,
    ClientSideFixedClippingDp,
    ServerSideAdaptiveClippingDp,
    ServerSideFixedClippingDp,
    make_accountant,
    wrap_strategy,
)
from fedprog.federated.privacy.local import LocalDpStrategy
from fedprog.federated.privacy.mods import (
    Mod,
    client_mods,
    is_legacy_message,
    message_privacy,
    privacy_mod,
    secagg_dispatch_mod,
)
from fedprog.federated.privacy.secagg import (
    KEY_ARRAY_NAMES,
    KEY_SECAGG_CLIPPING_RANGE,
    KEY_SECAGG_MAX_WEIGHT,
    KEY_SERVER_ROUND,
    SECAGG_STRATEGIES,
    EvaluateFn,
    SecAggNumPyClient,
    TrainFn,
    make_secagg_client_app,
    run_secagg,
    run_secagg_rounds,
    train_fn_from_handler,
)
from fedprog.federated.privacy.settings import (
    CLIPPING_SIDES,
    KEY_NUM_EXAMPLES,
    MODES,
    PREFIX,
    CentralDpSettings,
    LocalDpSettings,
    PrivacyConfigError,
    PrivacySettings,
    SecAggError,
    SecAggSettings,
    parse_privacy,
)

__all__ = [
    "CLIPPING_SIDES",
    "KEY_ARRAY_NAMES",
    "KEY_NUM_EXAMPLES",
    "KEY_SECAGG_CLIPPING_RANGE",
    "KEY_SECAGG_MAX_WEIGHT",
    "KEY_SERVER_ROUND",
    "MODES",
    "PREFIX",
    "SECAGG_STRATEGIES",
    "CentralDpSettings",
    "ClientSideAdaptiveClippingDp",
    "ClientSideFixedClippingDp",
    "EvaluateFn",
    "LocalDpSettings",
    "LocalDpStrategy",
    "Mod",
    "NoiseRng",
    "PrivacyConfigError",
    "PrivacySettings",
    "SecAggError",
    "SecAggNumPyClient",
    "SecAggSettings",
    "ServerSideAdaptiveClippingDp",
    "ServerSideFixedClippingDp",
    "TrainFn",
    "client_mods",
    "from_run_config",
    "is_legacy_message",
    "load_privacy_state",
    "make_accountant",
    "make_secagg_client_app",
    "message_privacy",
    "parse_privacy",
    "privacy_mod",
    "privacy_spent",
    "privacy_state",
    "run_secagg",
    "run_secagg_rounds",
    "secagg_dispatch_mod",
    "to_run_config",
    "train_fn_from_handler",
    "wrap_strategy",
]
