"""Survival losses (discrete-time NLL, Cox partial likelihood) and the logits -> survival/risk conversions.

Output conventions (shared with :mod:`fedprog.engine` and :mod:`fedprog.models`):

- ``n_outputs > 1``: the model returns one logit per time bin; hazards are ``h_k = sigmoid(logit_k)``, the
  survival curve is ``S_k = prod_{j<=k} (1 - h_j)`` and the risk score is ``-sum_k S_k`` (MCAT/SurvPath).
- ``n_outputs == 1``: the single output IS the log-risk (Cox / FLamby convention); there is no survival curve.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = [
    "SurvivalInputError",
    "check_survival_inputs",
    "cox_ph_loss",
    "nll_survival_loss",
    "risk_from_logits",
    "survival_from_logits",
]

#: Default weight of the uncensored term in the NLL loss (MCAT/SurvPath ``alpha_surv``).
DEFAULT_ALPHA = 0.5
#: Default floor applied to every probability before its logarithm (MCAT/SurvPath).
DEFAULT_EPS = 1e-7


class SurvivalInputError(ValueError):
    """Tensors given to a survival loss or conversion have the wrong shape, dtype or values."""


def check_survival_inputs(
    outputs: Tensor, time_or_bins: Tensor, censorship_or_event: Tensor, *, names: tuple[str, str, str]
) -> None:
    """Check that a loss' three tensors are 1-D/2-D with matching batch sizes; raise naming the argument.

    Parameters
    ----------
    outputs : Tensor, shape = (n_samples, n_outputs) or (n_samples,)
        Model outputs.
    time_or_bins, censorship_or_event : Tensor, shape = (n_samples,)
        Per-sample targets.
    names : tuple of str
        The three argument names used in error messages.
    """
    n = outputs.shape[0] if outputs.dim() >= 1 else -1
    for tensor, name in ((time_or_bins, names[1]), (censorship_or_event, names[2])):
        if tensor.dim() != 1:
            raise SurvivalInputError(
                f"{name} must be 1-D of shape (n_samples,), got shape {tuple(tensor.shape)}"
            )
        if tensor.shape[0] != n:
            raise SurvivalInputError(
                f"{names[0]} has {n} samples but {name} has {tensor.shape[0]} (shapes {tuple(outputs.shape)} "
                f"and {tuple(tensor.shape)})"
            )
    if not torch.is_floating_point(outputs):
        raise SurvivalInputError(f"{names[0]} must be a float tensor, got {outputs.dtype}")


def _check_binary(values: Tensor, name: str) -> None:
    if not bool(((values == 0) | (values == 1)).all()):
        bad = values[(values != 0) & (values != 1)][:5].tolist()
        raise SurvivalInputError(f"{name} must contain only 0 and 1, found {bad}")


def survival_from_logits(logits: Tensor) -> Tensor:
    """Discrete-time survival curve from per-bin hazard logits.

    Parameters
    ----------
    logits : Tensor, float, shape = (n_samples, n_bins), n_bins >= 2
        Hazard logits; ``h_k = sigmoid(logits[:, k])``.

    Returns
    -------
    Tensor, float, shape = (n_samples, n_bins)
        ``S_k = prod_{j<=k} (1 - h_j)``: the probability of surviving past bin ``k`` (non-increasing in k).

    Examples
    --------
    >>> survival_from_logits(torch.zeros(1, 2))
    tensor([[0.5000, 0.2500]])
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise SurvivalInputError(
            f"logits must have shape (n_samples, n_bins >= 2), got {tuple(logits.shape)}; a single output "
            "is a log-risk and has no survival curve"
        )
    return torch.cumprod(1.0 - torch.sigmoid(logits), dim=1)


def risk_from_logits(logits: Tensor) -> Tensor:
    """Risk score per sample (higher = earlier expected event).

    Parameters
    ----------
    logits : Tensor, float, shape = (n_samples, n_outputs)
        Model outputs. With ``n_outputs == 1`` the output is the log-risk and is returned unchanged.

    Returns
    -------
    Tensor, float, shape = (n_samples,)
        ``-sum_k S_k`` for ``n_outputs > 1`` (MCAT/SurvPath's risk); the log-risk for ``n_outputs == 1``.

    Examples
    --------
    >>> risk_from_logits(torch.zeros(1, 2))
    tensor([-0.7500])
    """
    if logits.dim() != 2:
        raise SurvivalInputError(f"logits must have shape (n_samples, n_outputs), got {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return logits[:, 0]
    return -survival_from_logits(logits).sum(dim=1)


def nll_survival_loss(
    logits: Tensor,
    bins: Tensor,
    censorship: Tensor,
    alpha: float = DEFAULT_ALPHA,
    eps: float = DEFAULT_EPS,
    weight: Tensor | None = None,
) -> Tensor:
    """Discrete-time negative log-likelihood (Zadeh & Schmid 2020) with MCAT/SurvPath's uncensored weighting.

    Parameters
    ----------
    logits : Tensor, float, shape = (n_samples, n_bins)
        Hazard logits.
    bins : Tensor, long, shape = (n_samples,)
        Time bin ``y`` of each sample, in ``[0, n_bins)``.
    censorship : Tensor, float, shape = (n_samples,)
        1 = censored, 0 = event.
    alpha : float, optional, default: 0.5
        Extra weight of the uncensored term: ``L = (1 - alpha) (L_unc + L_cen) + alpha L_unc``.
    eps : float, optional, default: 1e-7
        Floor applied to each probability before its logarithm.
    weight : Tensor, float, shape = (n_samples,), optional
        Per-sample weights: the loss is then the weighted mean.

    Returns
    -------
    Tensor, float, shape = ()
        Mean (or weighted mean) loss over the batch.

    Notes
    -----
    With ``S_{-1} = 1``: ``L_unc = -(1 - c) [log S_{y-1} + log h_y]`` and ``L_cen = -c log S_y``.
    """
    check_survival_inputs(logits, bins, censorship, names=("logits", "bins", "censorship"))
    if logits.dim() != 2:
        raise SurvivalInputError(f"logits must have shape (n_samples, n_bins), got {tuple(logits.shape)}")
    n_bins = logits.shape[1]
    bins = bins.long()
    if bool(((bins < 0) | (bins >= n_bins)).any()):
        raise SurvivalInputError(
            f"bins must lie in [0, {n_bins}) for {n_bins} logits, found {sorted(set(bins.tolist()))}"
        )
    _check_binary(censorship, "censorship")
    c = censorship.to(logits.dtype)
    hazards = torch.sigmoid(logits)  # (B, K)
    survival = torch.cumprod(1.0 - hazards, dim=1)  # (B, K)
    survival_padded = torch.cat(
        [torch.ones_like(survival[:, :1]), survival], dim=1
    )  # (B, K + 1): S_{-1}..S_K-1
    y = bins[:, None]
    s_before = survival_padded.gather(1, y).squeeze(1).clamp_min(eps)  # S_{y-1}
    h_at = hazards.gather(1, y).squeeze(1).clamp_min(eps)  # h_y
    s_at = survival_padded.gather(1, y + 1).squeeze(1).clamp_min(eps)  # S_y
    uncensored = -(1.0 - c) * (torch.log(s_before) + torch.log(h_at))
    censored = -c * torch.log(s_at)
    loss = (1.0 - alpha) * (uncensored + censored) + alpha * uncensored
    if weight is not None:
        return (loss * weight).sum() / weight.sum()
    return loss.mean()


def cox_ph_loss(risk: Tensor, time: Tensor, event: Tensor) -> Tensor:
    """Negative Cox partial log-likelihood of one batch, Breslow's method for ties.

    Parameters
    ----------
    risk : Tensor, float, shape = (n_samples,) or (n_samples, 1)
        Log-risk (log hazard ratio) per sample.
    time : Tensor, float, shape = (n_samples,)
        Follow-up time.
    event : Tensor, float or bool, shape = (n_samples,)
        1 = event observed, 0 = censored.

    Returns
    -------
    Tensor, float, shape = ()
        ``-(1 / n_events) sum_{i: event} [r_i - log sum_{j: t_j >= t_i} exp(r_j)]``. The risk set is the batch
        (batch-level partial likelihood). With no event in the batch a ``UserWarning`` is issued and a zero
        loss (still attached to the graph) is returned, so an epoch does not stop halfway.
    """
    if risk.dim() == 2 and risk.shape[1] == 1:
        risk = risk[:, 0]
    if risk.dim() != 1:
        raise SurvivalInputError(
            f"risk must have shape (n_samples,) or (n_samples, 1), got {tuple(risk.shape)}"
        )
    check_survival_inputs(risk, time, event, names=("risk", "time", "event"))
    _check_binary(event.float(), "event")
    events = event.to(torch.bool)
    n_events = int(events.sum())
    if n_events == 0:
        warnings.warn("cox_ph_loss: no event in the batch; returning a zero loss", UserWarning, stacklevel=2)
        return risk.sum() * 0.0
    at_risk = time[None, :] >= time[:, None]  # (i, j): j is in the risk set of i
    scores = risk[None, :].expand(len(risk), -1).masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(scores, dim=1)  # (n,)
    return -(risk - log_denominator)[events].sum() / n_events
