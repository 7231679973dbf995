"""Client side: the Flower mods a site applies for the privacy settings announced in each train message.

The ``ClientApp`` (``client_app.py``) is built at import time, before any config is known, so the site side
is driven by the *messages*: the wrapped strategy writes ``privacy.*`` keys into every train
``ConfigRecord``, and :func:`privacy_mod` reads them and applies the matching Flower mod to that train
message only. SecAgg+ messages are in the legacy record format; :func:`secagg_dispatch_mod` hands them to
the legacy ``ClientApp`` built by :func:`~fedprog.federated.privacy.secagg.make_secagg_client_app` from the
same engine-based train function::

    def train_arrays(arrays, config, context) -> tuple[ArrayRecord, MetricRecord]: ...  # engine.train
    secagg_app = make_secagg_client_app(train_arrays)
    app = ClientApp(mods=[secagg_dispatch_mod(secagg_app), privacy_mod])

A hospital can pin local DP for itself, whatever the server sends, with
``flower-supernode --node-config "privacy.mode='local_dp' privacy.local_dp.epsilon=0.5 ..."``: ``privacy.*``
keys in the node config override the message's. If the server runs another DP mode the site refuses the
round (an error reply naming the node-config key) rather than silently mixing mechanisms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from omegaconf import DictConfig, OmegaConf

from fedprog.config import from_run_config
from fedprog.federated.privacy.settings import (
    PREFIX,
    CentralDpSettings,
    LocalDpSettings,
    PrivacyConfigError,
    PrivacySettings,
    parse_privacy,
)

# Record-name prefixes of the legacy (NumPyClient) message format.
_LEGACY_RECORD_PREFIXES = ("fitins.", "evaluateins.", "getparametersins", "getpropertiesins")

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


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
