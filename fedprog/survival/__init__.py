"""Survival analysis: losses (:mod:`~fedprog.survival.losses`), metrics (:mod:`~fedprog.survival.metrics`)."""

from __future__ import annotations

from fedprog.survival.losses import (
    SurvivalInputError,
    cox_ph_loss,
    nll_survival_loss,
    risk_from_logits,
    survival_from_logits,
)

__all__ = [
    "SurvivalInputError",
    "cox_ph_loss",
    "nll_survival_loss",
    "risk_from_logits",
    "survival_from_logits",
]
