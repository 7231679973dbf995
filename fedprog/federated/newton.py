"""Federated Newton's method for the linear Cox model (``strategy=newton``): a pooled statistician's fit.

Each round every training site computes, at the global weights, the value, gradient and Hessian of its own
Cox partial likelihood over all its training cases (one stratum per site: each hospital keeps its own
baseline hazard) and sends those sums; the server adds them, divides by the federation's events, adds the L2
penalty ``training.weight_decay`` (as Adam's ``weight_decay`` does: ``lambda / 2 ||w||^2`` on every weight)
and takes one Newton step. The sum of the sites' terms *is* the pooled stratified Cox likelihood, so the
federation converges (quadratically, in a few rounds) to the same model as a stratified ridge Cox fitted on
the pooled cases; no local epochs, learning rate or client drift. FedAvg with local Adam steps does not reach
that optimum (README, "Leave-one-cancer-out on real TCGA").

A site's reply is an aggregate of its cases (a gradient and a ``P x P`` curvature matrix, where ``P`` is the
model's number of weights, about 60 on TCGA), bounded by the same disclosure minimums as every reply; the
Hessian is exact for a model linear in its weights, so only ``model=linear_cox`` is accepted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from torch import Tensor, nn

from fedprog import engine
from fedprog.data import SurvivalDataset
from fedprog.federated.errors import RunFailed, SettingsError
from fedprog.federated.messages import ReplyError
from fedprog.survival.cox_terms import cox_terms

log = logging.getLogger(__name__)

NAME = "newton"
GRAD_PREFIX = "grad/"  # reply arrays: "grad/<weight name>" per weight, then HESSIAN
HESSIAN = "hessian"
#: Largest Hessian a site computes and sends (parameters per side): 2,000 x 2,000 float64 = 32 MB.
MAX_PARAMETERS = 2000


class NewtonSettingsError(SettingsError):
    """``strategy=newton`` with settings it cannot honour; the message names the key."""


def check_settings(cfg: Any) -> None:
    """Refuse, in one line naming the key, what Newton's method cannot do (called before start-up)."""
    if str(cfg.strategy.name) != NAME:
        return
    training, strategy = cfg.training, cfg.strategy
    checks = (
        (
            str(cfg.model.name) == "linear_cox",
            f"model.name={cfg.model.name!r}: needs model=linear_cox (the Hessian a site sends is exact only "
            "for a model linear in its weights)",
        ),
        (str(training.loss) == "cox", f"training.loss={training.loss!r}: needs training.loss=cox"),
        (
            float(training.weight_decay) > 0,
            "training.weight_decay must be > 0 (the Cox likelihood is flat along the model's bias, so "
            "Newton's system needs the ridge term)",
        ),
        (float(training.get("l1", 0.0)) == 0, "training.l1 must be 0 (the L1 penalty has no Hessian)"),
        (
            str(cfg.privacy.mode) == "none",
            f"privacy.mode={cfg.privacy.mode!r}: Newton replies are not clipped, noised or masked; "
            "use privacy=none",
        ),
        (
            float(strategy.fraction_train) == 1.0,
            "strategy.fraction_train must be 1.0 (a Newton step needs every training site's terms)",
        ),
        (float(strategy.max_step) > 0, "strategy.max_step must be > 0"),
        (float(strategy.damping) >= 0, "strategy.damping must be >= 0"),
    )
    for ok, reason in checks:
        if not ok:
            raise NewtonSettingsError(f"strategy=newton: {reason}")


# ------------------------------------------------------------------------------------------------ site side
@dataclass(frozen=True)
class SiteTerms:
    """A site's Cox terms at the global weights, in the order of ``names`` (the model's weights)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    value: float  # negative partial log-likelihood, summed over the site's events
    grad: np.ndarray  # (P,)
    hessian: np.ndarray  # (P, P)
    n_events: int

    def arrays(self) -> dict[str, np.ndarray]:
        """The reply's arrays: the gradient per weight (its shape), then the Hessian."""
        out: dict[str, np.ndarray] = {}
        start = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            out[GRAD_PREFIX + name] = self.grad[start : start + size].reshape(shape)
            start += size
        out[HESSIAN] = self.hessian
        return out


def site_terms(
    model: nn.Module, data: SurvivalDataset, *, device: torch.device, batch_size: int
) -> SiteTerms:
    """Value, gradient and Hessian of the Cox partial likelihood of every case of ``data`` (one stratum),
    in the model's weights (eval mode: no dropout); the Jacobian comes from autograd, the curvature in the
    log-risks from :func:`fedprog.survival.cox_terms.cox_terms`."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    n_params = sum(p.numel() for p in params.values())
    if n_params > MAX_PARAMETERS:
        raise NewtonSettingsError(
            f"strategy=newton: the model has {n_params} weights, more than {MAX_PARAMETERS} (Hessian size)"
        )
    model.to(device).eval()
    params = {name: p.to(device) for name, p in params.items()}
    risks, jacobians, times, events = [], [], [], []
    was_training = data.training
    data.eval()
    try:
        for batch in engine.ordered_loader(data, batch_size):
            batch = batch.to(device)

            def risk_of(weights: dict[str, torch.Tensor], batch: Any = batch) -> tuple[Tensor, Tensor]:
                risk = torch.func.functional_call(model, weights, (batch,)).reshape(-1)
                return risk, risk.detach()

            jac, risk = torch.func.jacrev(risk_of, has_aux=True)(params)  # one forward pass per batch
            risks.append(risk.double())
            jacobians.append(torch.cat([jac[k].reshape(len(batch.time), -1) for k in params], 1).double())
            times.append(batch.time.double())
            events.append(1.0 - batch.censorship.double())
    finally:
        data.train(was_training)
    jacobian = torch.cat(jacobians)
    terms = cox_terms(torch.cat(risks), torch.cat(times), torch.cat(events))
    return SiteTerms(
        names=tuple(params),
        shapes=tuple(tuple(p.shape) for p in params.values()),
        value=float(terms.value),
        grad=(jacobian.T @ terms.grad).cpu().numpy(),
        hessian=terms.hessian(jacobian).cpu().numpy(),
        n_events=terms.n_events,
    )


def numpy_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, Array]:
    """``{name: Array}`` for an ArrayRecord (float64 kept: a Hessian loses nothing in transit)."""
    return {key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()}


# ---------------------------------------------------------------------------------------------- server side
def weight_names(reference: Mapping[str, np.ndarray]) -> list[str]:
    """The weights a Newton step moves, in the global model's order (its floating-point arrays); the
    Hessian's rows follow this order."""
    return [k for k, v in reference.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def check_reply(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """Raise ReplyError unless ``arrays`` is a Newton reply for the global weights ``reference``: a gradient
    for each weight in :func:`weight_names` order, then the Hessian; returns the gradient's L2 norm (the
    round report's update norm)."""
    if HESSIAN not in arrays:
        raise ReplyError(f"Newton reply has no {HESSIAN!r} array")
    expected = [GRAD_PREFIX + k for k in weight_names(reference)] + [HESSIAN]
    if list(arrays) != expected:
        raise ReplyError(f"Newton reply arrays {list(arrays)[:4]} do not match the model's {expected[:4]}")
    grads = {k[len(GRAD_PREFIX) :]: v for k, v in arrays.items() if k != HESSIAN}
    size = 0
    for name, grad in grads.items():
        if grad.shape != reference[name].shape:
            raise ReplyError(f"gradient of {name!r} has shape {grad.shape}, expected {reference[name].shape}")
        size += grad.size
    hessian = arrays[HESSIAN]
    if hessian.shape != (size, size):
        raise ReplyError(f"Hessian has shape {hessian.shape}, expected ({size}, {size})")
    for name, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
            raise ReplyError(f"array {name!r} is not finite floating point")
    if not np.allclose(hessian, hessian.T, rtol=1e-6, atol=1e-8 * max(1.0, float(np.abs(hessian).max()))):
        raise ReplyError("Hessian is not symmetric")
    return float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())))


@dataclass(frozen=True)
class NewtonStep:
    """One server step: the new weights (the names of the reply) and what it measured at the old ones."""

    weights: dict[str, np.ndarray]
    objective: float  # penalized mean negative partial log-likelihood per event at the old weights
    gradient_norm: float
    step_norm: float
    clipped: bool


def newton_step(
    replies: Iterable[tuple[Mapping[str, np.ndarray], float, int]],
    current: Mapping[str, np.ndarray],
    *,
    l2: float,
    damping: float,
    max_step: float,
) -> NewtonStep:
    """Sum the sites' ``(arrays, value, n_events)`` (screened by :func:`check_reply`), add the ridge term
    and take one (trust-region clipped) Newton step from ``current``; non-float arrays are kept."""
    replies = list(replies)
    names = weight_names(current)
    order = [GRAD_PREFIX + n for n in names]
    total_events = sum(n for _, _, n in replies)
    if total_events <= 0:
        raise ReplyError("the training sites report no event: the Cox likelihood has nothing to fit")
    grad = np.zeros(sum(current[n].size for n in names))
    hessian = np.zeros((grad.size, grad.size))
    value = 0.0
    for arrays, site_value, _ in replies:
        grad += np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in order])
        hessian += np.asarray(arrays[HESSIAN], dtype=np.float64)
        value += float(site_value)
    weights = np.concatenate([np.asarray(current[n], dtype=np.float64).ravel() for n in names])
    grad = grad / total_events + l2 * weights
    hessian = hessian / total_events + (l2 + damping) * np.eye(grad.size)
    try:
        step = np.linalg.solve(hessian, grad)
    except np.linalg.LinAlgError as error:
        raise ReplyError(f"the summed Hessian cannot be solved ({error})") from None
    norm = float(np.linalg.norm(step))
    clipped = norm > max_step
    if clipped:
        step *= max_step / norm
    updated, start = dict(current), 0
    for name in names:
        size = current[name].size
        new = weights[start : start + size] - step[start : start + size]
        updated[name] = new.reshape(current[name].shape).astype(current[name].dtype)
        start += size
    objective = value / total_events + 0.5 * l2 * float(weights @ weights)
    return NewtonStep(updated, objective, float(np.linalg.norm(grad)), min(norm, max_step), clipped)


class FedNewton(FedAvg):
    """Flower strategy of federated Newton steps (module doc); the held-out-aware mixin goes in front of it.

    Replies are screened by :func:`check_reply` (the mixin's ``check_reply_arrays``); ``aggregate_train``
    sums them and returns the stepped global model, and ``last_info`` keeps what the step measured.
    """

    def __init__(
        self, *, max_step: float = 10.0, damping: float = 0.0, l2: float = 1e-3, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.max_step, self.damping, self.l2 = float(max_step), float(damping), float(l2)
        self.last_info: dict[str, Any] = {}

    def check_reply_arrays(self, arrays: Mapping[str, np.ndarray]) -> tuple[str | None, float]:
        """Why a reply's arrays are unusable (None when usable) and its gradient norm."""
        try:
            return None, check_reply(arrays, self._global)  # type: ignore[attr-defined]
        except ReplyError as error:
            return str(error), math.nan

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One Newton step from the round's global weights over the screened replies of every training site
        (a step over some of them would fit another likelihood: the run fails, naming the missing sites)."""
        report = self.last_round  # type: ignore[attr-defined]  # the mixin's screening of this round
        reasons = {r.site: r.reason for r in report.rejected}
        trained = set(self.train_nodes.values())  # type: ignore[attr-defined]
        missing = {site: reasons.get(site, "no reply") for site in sorted(trained - set(report.accepted))}
        if missing:
            raise RunFailed(
                f"round {server_round}: a Newton step needs every training site; missing {missing}"
            )
        terms = []
        for msg in replies:
            arrays = {k: v.numpy() for k, v in next(iter(msg.content.array_records.values())).items()}
            metrics = next(iter(msg.content.metric_records.values()))
            value = metrics.get("cox-value", math.nan)  # reported only: the step needs no value
            terms.append((arrays, float(value), int(metrics["n-events"])))
        try:
            step = newton_step(
                terms,
                self._global,
                l2=self.l2,
                damping=self.damping,
                max_step=self.max_step,  # type: ignore[attr-defined]
            )
        except ReplyError as error:
            raise RunFailed(f"round {server_round}: no Newton step: {error}") from None
        self.last_info = {
            "objective": step.objective,
            "gradient_norm": step.gradient_norm,
            "step_norm": step.step_norm,
            "clipped": step.clipped,
        }
        log.info(
            "round %d: Newton step %.3g%s, objective %.6f, gradient norm %.3g",
            server_round,
            step.step_norm,
            " (clipped)" if step.clipped else "",
            step.objective,
            step.gradient_norm,
        )
        arrays = ArrayRecord(numpy_arrays(step.weights))
        return arrays, MetricRecord({"objective": step.objective, "gradient-norm": step.gradient_norm})
