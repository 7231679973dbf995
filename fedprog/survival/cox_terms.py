"""Value, gradient and Hessian of the Cox partial likelihood in the log-risks (Breslow's method for ties).

Newton's method on a Cox model needs the second derivatives that :func:`fedprog.survival.losses.cox_ph_loss`
leaves to autograd; computing them in the log-risks ``eta`` once (an ``n x n`` matrix written as
``diag(s) - P^T P``) and chaining them through the model's Jacobian makes a site's exact Hessian cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedprog.survival.losses import SurvivalInputError, check_survival_inputs


@dataclass(frozen=True)
class CoxTerms:
    """The negative partial log-likelihood of one stratum, summed over its events, and its derivatives.

    ``risk_weights`` (events x cases) holds, per event ``i``, the softmax of the log-risks over its risk set
    (zero outside it); the Hessian in the log-risks is ``diag(risk_weights.sum(0)) - risk_weights^T
    risk_weights``, so a Jacobian ``J`` (cases x parameters) gives the parameters' Hessian without forming
    the ``n x n`` matrix: ``J^T diag(s) J - (P J)^T (P J)``.
    """

    value: Tensor  # () sum over events of -(eta_i - log sum_{j: t_j >= t_i} exp(eta_j))
    grad: Tensor  # (n,) d value / d eta
    risk_weights: Tensor  # (n_events, n)
    n_events: int

    def hessian(self, jacobian: Tensor) -> Tensor:
        """``J^T (d^2 value / d eta^2) J`` for a Jacobian ``J`` of shape (n, n_parameters)."""
        spread = self.risk_weights.sum(0)
        mixed = self.risk_weights @ jacobian
        return jacobian.T @ (spread[:, None] * jacobian) - mixed.T @ mixed


def cox_terms(risk: Tensor, time: Tensor, event: Tensor) -> CoxTerms:
    """Breslow negative partial log-likelihood of one stratum (summed, not averaged) and its derivatives.

    Parameters
    ----------
    risk : Tensor, float, shape = (n,)
        Log-risk per case (computed in float64).
    time : Tensor, float, shape = (n,)
        Follow-up time.
    event : Tensor, shape = (n,)
        1 = event observed, 0 = censored.

    Returns
    -------
    CoxTerms
        ``value`` equals ``cox_ph_loss(risk, time, event) * n_events``; with no event, zeros.
    """
    if risk.dim() != 1:
        raise SurvivalInputError(f"risk must have shape (n,), got {tuple(risk.shape)}")
    check_survival_inputs(risk, time, event, names=("risk", "time", "event"))
    risk = risk.detach().to(torch.float64)
    events = event.to(torch.bool)
    at_risk = time[None, :] >= time[events][:, None]  # (event i, case j): j is in the risk set of i
    scores = risk[None, :].expand(int(events.sum()), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(scores, dim=1)
    weights = torch.exp(scores - log_denominator[:, None])
    value = (log_denominator - risk[events]).sum()
    grad = weights.sum(0) - events.to(torch.float64)
    return CoxTerms(value=value, grad=grad, risk_weights=weights, n_events=int(events.sum()))
