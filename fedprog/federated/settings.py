"""The run settings a federation checks before start-up, so a site or the server never refuses them later."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from fedprog.engine import TrainConfig
from fedprog.federated import newton
from fedprog.federated.errors import SettingsError


def check_run_settings(cfg: Any) -> None:
    """Raise :class:`SettingsError` (one line naming the key) for what would fail once the run has started:
    the training config every site validates before training or evaluating (e.g. ``training.loss=cox`` with
    one case per batch), and what ``strategy=newton`` cannot do (:func:`newton.check_settings`)."""
    try:
        TrainConfig.from_cfg(OmegaConf.to_container(cfg.training, resolve=True))
    except ValueError as error:
        raise SettingsError(str(error)) from None
    newton.check_settings(cfg)
