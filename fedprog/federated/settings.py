"""The run settings a federation checks before start-up, so a site or the server never refuses them later."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from fedprog.engine import TrainConfig
from fedprog.federated import newton
from fedprog.federated.errors import SettingsError


def check_run_settings(cfg: Any, strong_kind: str | None = None) -> None:
    """Raise :class:`SettingsError` (one line naming the key) for what would fail once the run has started:
    the training config every site validates before training or evaluating (e.g. ``training.loss=cox`` with
    one case per batch), the model and its modules (:func:`check_model_settings`), what
    ``strategy=newton`` cannot do (:func:`newton.check_settings`), and the server's ``reply_poll_s``."""
    try:
        TrainConfig.from_cfg(OmegaConf.to_container(cfg.training, resolve=True))
    except ValueError as error:
        raise SettingsError(str(error)) from None
    check_model_settings(cfg.model, strong_kind)
    newton.check_settings(cfg)
    poll = cfg.get("reply_poll_s")
    if poll is not None and not float(poll) > 0:
        raise SettingsError(
            f"reply_poll_s={poll}: choose a positive number of seconds (null: Flower's own wait)"
        )
    if poll is not None and not float(cfg.reply_poll_max_s) >= float(poll):
        raise SettingsError(f"reply_poll_max_s={cfg.reply_poll_max_s}: choose at least reply_poll_s={poll}")


def check_model_settings(model_cfg: Any, strong_kind: str | None = None) -> None:
    """Raise :class:`SettingsError` for a model config the server or a site would refuse when it builds the
    model: unknown or out-of-range keys, module settings (SDIR, CADE), and, once the data's strong modality
    is known (``strong_kind``: wsi, tabular or none), what the backbone and modules need of it (the model is
    built on placeholder shapes)."""
    from fedprog.models import SDIR, ModelConfig, ModelConfigError, build_cade, create_model, list_models

    try:
        config = ModelConfig.from_cfg(OmegaConf.to_container(model_cfg, resolve=True))
        if strong_kind is not None:
            placeholder = {"group_index": [[0]], "strong_dim": 1, "n_outputs": 1, "announce": False}
            create_model(config, strong_kind=strong_kind, **placeholder)
            return
        if config.name not in list_models():
            raise ModelConfigError(f"unknown model.name={config.name!r}; registered models: {list_models()}")
        if config.sdir.enabled:
            SDIR(**config.sdir.kwargs())
        if config.cade.enabled:
            build_cade(config.cade)
    except ModelConfigError as error:
        raise SettingsError(str(error)) from None
