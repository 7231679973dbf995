"""The one training and evaluation code path, shared by ``fedprog train`` and the Flower client."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from fedprog.data import Batch, SurvivalBins, SurvivalDataset, collate
from fedprog.device import autocast, resolve_device
from fedprog.survival.losses import cox_ph_loss, nll_survival_loss, risk_from_logits, survival_from_logits
from fedprog.survival.metrics import NoComparablePairsError, evaluate_predictions, stratified_harrell_cindex

log = logging.getLogger(__name__)

WITHIN_SOURCES = "c_index_within_sources"  # validation metric of ``stratify_sources`` (epoch selection)

OPTIMIZERS = {
    "radam": lambda params, c: torch.optim.RAdam(
        params, lr=c.lr, weight_decay=c.weight_decay, decoupled_weight_decay=True
    ),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(
        params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (``configs/training/*.yaml``).

    ``epochs`` passes over the data, or exactly ``local_steps`` optimizer steps when that is set (FLamby's
    federated protocol). One optimizer step uses ``batch_size * grad_accum`` patients: batches of one bag with
    gradient accumulation are the MCAT/SurvPath practice; padded batches (``batch_size > 1``) suit tabular
    data and the Cox loss, whose risk sets live inside one batch. Federated clients call :func:`train` once
    per round: ``keep_optimizer_state`` carries the optimizer moments (and RAdam's step count) from one call
    to the next, and the schedule runs over the whole run (:class:`RunPosition`), never restarting per round.

    ``stratify_sources`` treats the sources of pooled data (source cancers, training sites) as strata, as a
    stratified Cox model does: each source keeps its own baseline hazard in training (NLL: a fixed per-source
    offset on the hazard logits, :func:`source_baselines`, dropped after training; Cox: risk sets within one
    source) and the validation C-index that selects the epoch compares patients within a source only
    (``select_on="val_loss"`` keeps the plain, unstratified validation loss).
    Without it a pooled model is rewarded for recognizing which source (cancer) a patient comes from, which
    ranks nobody within an unseen cancer. One source (a federated client's site) makes it a no-op.

    ``weight_average="ema"`` keeps an exponential moving average of the weights over the optimizer steps
    (decay ``ema_decay`` per step; parameters only, buffers such as CADE's style banks are the model's):
    validation, epoch selection and the returned model use the averaged weights, as weight-averaging methods
    for domain generalization do (SWAD). The average starts from the weights each call receives, so a
    federated client averages within its round.
    """

    epochs: int = 20
    local_steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    optimizer: str = "radam"
    lr: float = 5e-4
    weight_decay: float = 1e-3
    momentum: float = 0.0
    scheduler: str = "cosine"
    warmup_epochs: float = 1.0
    keep_optimizer_state: bool = True
    loss: str = "nll"
    stratify_sources: bool = False
    alpha_surv: float = 0.5
    balanced_sampling: bool = True
    max_grad_norm: float | None = None
    proximal_mu: float = 0.0
    l1: float = 0.0  # L1 penalty on the weight matrices (with weight_decay's L2: an elastic net)
    amp: bool = False
    amp_dtype: str = "bfloat16"
    select_on: str = "val_c_index"
    weight_average: str = "none"
    ema_decay: float = 0.995
    eval_every: int = 1
    eval_batch_size: int = 1
    tabular_eval_batch_size: int = 256  # cases of equal token count (tables, expression only): no padding
    num_workers: int = 0
    seed: int = 0
    num_threads: int | None = None
    device: str = "auto"  # auto | cpu | cuda[:N] (fedprog.device): train()/evaluate() default device
    max_patches: int | None = 4096  # patches sampled per bag in training (the datasets' setting)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], **overrides: Any) -> TrainConfig:
        """Build from a (Hydra) mapping; unknown keys raise so that typos never pass silently."""
        values = {**dict(cfg), **overrides}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"training config: unknown key(s) {unknown}; known keys: {sorted(known)}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"training.optimizer={self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.loss not in {"nll", "cox"}:
            raise ValueError(f"training.loss={self.loss!r}; choose 'nll' or 'cox'")
        if self.scheduler not in {"cosine", "constant"}:
            raise ValueError(f"training.scheduler={self.scheduler!r}; choose 'cosine' or 'constant'")
        if self.loss == "cox" and self.batch_size < 2:
            raise ValueError("training.loss='cox' needs training.batch_size >= 2 (risk sets live in a batch)")
        if self.select_on not in {"last", "val_c_index", "val_loss"}:
            raise ValueError(f"training.select_on={self.select_on!r}; choose last, val_c_index or val_loss")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("training.batch_size and training.grad_accum must be >= 1")
        if not self.l1 >= 0:
            raise ValueError(f"training.l1={self.l1!r}; choose a penalty >= 0 (0: none)")
        if self.weight_average not in {"none", "ema"}:
            raise ValueError(f"training.weight_average={self.weight_average!r}; choose 'none' or 'ema'")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"training.ema_decay={self.ema_decay!r}; choose a decay in (0, 1)")


@dataclass(frozen=True)
class RunPosition:
    """Where one :func:`train` call sits in a multi-call run: call ``index`` (0-based) of ``calls``.

    A federated client trains once per round with the same number of local steps, so round ``r`` of ``R``
    covers global steps ``r * steps .. (r + 1) * steps - 1`` of a schedule of ``R * steps`` steps.
    """

    index: int = 0
    calls: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.calls:
            raise ValueError(f"run position: call index {self.index} outside 0..{self.calls - 1}")


@dataclass
class TrainHistory:
    """What one call of :func:`train` did: per-epoch losses and validation scores, the selected epoch."""

    epoch_loss: list[float] = field(default_factory=list)
    val_metrics: list[dict[str, float]] = field(default_factory=list)
    n_steps: int = 0
    n_examples_seen: int = 0
    selected_epoch: int | None = None
    seconds: float = 0.0
    no_event_batches: int = 0
    optimizer_state: dict[str, torch.Tensor] | None = None  # flat (optimizer_state_dict); None: not kept
    lr_last: float = math.nan  # learning rate of the last step taken

    @property
    def loss(self) -> float:
        """Mean training loss of the last epoch (NaN before any epoch)."""
        return self.epoch_loss[-1] if self.epoch_loss else float("nan")


@dataclass
class EvalResult:
    """Predictions and metrics of one evaluation. ``risk``/``survival`` are patient-level: keep them local."""

    case_ids: list[str]
    risk: np.ndarray  # (n,) higher = worse
    survival: np.ndarray  # (n, n_bins) discrete survival curve at the bin ends, or (n, 0) for Cox
    time: np.ndarray  # (n,) months
    censorship: np.ndarray  # (n,) 1 = censored
    metrics: dict[str, float]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(device: torch.device, cfg: TrainConfig):
    return autocast(device, enabled=cfg.amp, dtype=cfg.amp_dtype)


def _sampler(data: SurvivalDataset, cfg: TrainConfig, generator: torch.Generator) -> Sampler[int]:
    """Class-balanced sampling over (bin, censorship) strata as MCAT/SurvPath, or a plain shuffle."""
    if not cfg.balanced_sampling:
        return RandomSampler(data, generator=generator)
    weights = torch.as_tensor(_sampling_weights(data, cfg), dtype=torch.double)
    return WeightedRandomSampler(weights, len(data), generator=generator)


def _loader(
    data: SurvivalDataset, batch_size: int, sampler: Sampler[int] | None, num_workers: int = 0
) -> DataLoader:
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        collate_fn=collate,
        num_workers=num_workers,
    )


def survival_loss(outputs: torch.Tensor, batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """The configured survival loss of one batch (NLL on bins, or Cox partial likelihood)."""
    if cfg.loss == "cox":
        return cox_ph_loss(outputs.reshape(-1), batch.time, 1.0 - batch.censorship)
    return nll_survival_loss(outputs, batch.bins, batch.censorship, alpha=cfg.alpha_surv)


@dataclass
class _SourceStrata:
    """``stratify_sources`` in training: each pooled source keeps its own baseline hazard (class doc)."""

    data: SurvivalDataset
    offsets: torch.Tensor | None  # NLL: (n_sources, n_bins) fixed logit offsets, never part of the model

    @classmethod
    def create(cls, data: SurvivalDataset, cfg: TrainConfig, device: torch.device) -> _SourceStrata | None:
        """The strata of ``data``, or None when ``cfg.stratify_sources`` is off or there is one source."""
        if not cfg.stratify_sources or data.n_sources < 2:
            return None
        return cls(data, None if cfg.loss == "cox" else source_baselines(data, cfg).to(device))

    def loss(self, outputs: torch.Tensor, batch: Batch, cfg: TrainConfig) -> torch.Tensor:
        """The survival loss with a baseline per source (NLL) or risk sets within each source (Cox; the
        event-weighted mean of the sources' partial likelihoods; the caller skips a batch without event)."""
        sources = torch.as_tensor(self.data.source_index(batch.case_ids), device=outputs.device)
        if self.offsets is not None:
            shifted = outputs + self.offsets[sources]
            return nll_survival_loss(shifted, batch.bins, batch.censorship, alpha=cfg.alpha_surv)
        events, risk = 1.0 - batch.censorship, outputs.reshape(-1)
        terms, n_events = [], []
        for source in torch.unique(sources):
            inside = sources == source
            if events[inside].sum() > 0:
                terms.append(cox_ph_loss(risk[inside], batch.time[inside], events[inside]))
                n_events.append(events[inside].sum())
        weights = torch.stack(n_events)
        return (torch.stack(terms) * weights).sum() / weights.sum()


def _sampling_weights(data: SurvivalDataset, cfg: TrainConfig) -> np.ndarray:
    """Each case's probability weight under the training sampler (class-balanced or uniform)."""
    if not cfg.balanced_sampling:
        return np.ones(len(data))
    _, inverse, counts = np.unique(np.asarray(data.strata()), axis=0, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse.reshape(-1)]


def source_baselines(data: SurvivalDataset, cfg: TrainConfig, steps: int = 50) -> torch.Tensor:
    """Per-source hazard-logit offsets of pooled ``data``: the stratified no-feature model's baselines.

    Fits one logit per (source, bin) with the training loss (NLL, ``alpha_surv``, the sampler's case weights)
    by L-BFGS, and centres them over the sources (case-weighted), so the model's own bias carries the pooled
    baseline. Held fixed in training, they leave a model nothing to gain from telling the sources apart: a
    source-level shift of its output moves away from this optimum. Shape (n_sources, n_bins).
    """
    sources = torch.as_tensor(data.source_index(data.case_ids))
    bins = torch.as_tensor(np.asarray(data.bin_labels), dtype=torch.long)
    censorship = torch.as_tensor(np.asarray(data.censorship), dtype=torch.float32)
    weight = torch.as_tensor(_sampling_weights(data, cfg), dtype=torch.float32)
    logits = torch.zeros(data.n_sources, data.bins.n_bins, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nll_survival_loss(logits[sources], bins, censorship, alpha=cfg.alpha_surv, weight=weight)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = logits.detach()
    share = torch.bincount(sources, weights=weight, minlength=data.n_sources)
    return fitted - (share[:, None] * fitted).sum(0) / share.sum()


def _proximal_term(model: nn.Module, global_params: Sequence[torch.Tensor]) -> torch.Tensor:
    """FedProx: 0.5 * ||w - w_global||^2 over the trainable parameters."""
    terms = [
        (param - anchor).pow(2).sum()
        for param, anchor in zip(model.parameters(), global_params, strict=True)
        if param.requires_grad
    ]
    return 0.5 * torch.stack(terms).sum()


def l1_term(model: nn.Module) -> torch.Tensor:
    """Sum of absolute values of the trainable weight matrices (parameters of 2+ dimensions; biases and
    norm scales are not penalized), the L1 part of ``training.l1``."""
    terms = [p.abs().sum() for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _lr_lambda(cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
    """LR factor of global step ``step`` in a run of ``total_steps`` (linear warm-up, then cosine)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch)) if cfg.scheduler == "cosine" else 0

    def factor(step: int) -> float:
        if cfg.scheduler == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimizer_state_dict(optimizer: torch.optim.Optimizer, name: str) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat ``<name>/<param index>/<key>`` CPU tensors.

    Flat tensors travel in a Flower ``ArrayRecord`` (the client's ``context.state``); hyper-parameters are not
    stored: they come from the config of every call.
    """
    flat = {}
    for index, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            if value is None:
                continue
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            flat[f"{name}/{index}/{key}"] = tensor.detach().to("cpu", copy=True)
    return flat


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, name: str, flat: Mapping[str, torch.Tensor]
) -> None:
    """Load the state written by :func:`optimizer_state_dict` into a fresh ``optimizer`` of kind ``name``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        kind, index, entry = key.split("/", 2)
        if kind != name:
            raise ValueError(
                f"training.optimizer={name!r} but the kept optimizer state is {kind!r}; "
                "set training.keep_optimizer_state=false or keep the optimizer"
            )
        state.setdefault(int(index), {})[entry] = torch.as_tensor(value).clone()
    current = optimizer.state_dict()
    n_params = sum(len(group["params"]) for group in current["param_groups"])
    if state and max(state) >= n_params:
        raise ValueError(f"kept optimizer state has parameter {max(state)} but the model has {n_params}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def _batches(loader: DataLoader, data: SurvivalDataset) -> Iterator[Batch]:
    """Endless batches; each pass over the data re-draws the patch subsets (``set_epoch``)."""
    n_pass = 0
    while True:
        data.set_epoch(n_pass)
        n_pass += 1
        yield from loader


@dataclass(frozen=True)
class _Plan:
    """Step counts of one :func:`train` call; its learning rates follow the schedule of the whole run."""

    steps_per_epoch: int
    total_steps: int
    n_epochs: int
    lr_factor: Callable[[int], float]
    first_step: int  # global step of this call's first local step

    def lr(self, cfg: TrainConfig, local_step: int) -> float:
        """Learning rate of this call's step ``local_step``."""
        return cfg.lr * self.lr_factor(self.first_step + local_step)


def _plan(cfg: TrainConfig, n_batches: int, run: RunPosition) -> _Plan:
    steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
    total_steps = cfg.local_steps or steps_per_epoch * cfg.epochs
    return _Plan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        n_epochs=math.ceil(total_steps / steps_per_epoch),
        lr_factor=_lr_lambda(cfg, total_steps * run.calls, steps_per_epoch),
        first_step=run.index * total_steps,  # the schedule is defined over the whole run
    )


def _optimizer(
    model: nn.Module, cfg: TrainConfig, optimizer_state: Mapping[str, torch.Tensor] | None
) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters, with the kept state when enabled."""
    optimizer = OPTIMIZERS[cfg.optimizer]([p for p in model.parameters() if p.requires_grad], cfg)
    if optimizer_state and cfg.keep_optimizer_state:
        load_optimizer_state(optimizer, cfg.optimizer, optimizer_state)
    return optimizer


def _batch_loss(
    model: nn.Module,
    batch: Batch,
    cfg: TrainConfig,
    device: torch.device,
    anchors: Sequence[torch.Tensor] | None,
    history: TrainHistory,
    strata: _SourceStrata | None = None,
) -> torch.Tensor:
    """Loss of one batch: survival loss (zero for a Cox batch without event), FedProx term, L1 penalty.

    The L1 penalty enters as a subgradient, so coefficients it sets to zero stay within about one step of
    the learning rate of zero rather than exactly at it (``training.l1``).
    """
    with _autocast(device, cfg):
        outputs = model(batch)
    if cfg.loss == "cox" and bool((batch.censorship > 0).all()):
        loss = outputs.float().sum() * 0.0  # no event, no Cox risk set: counted, not warned
        history.no_event_batches += 1
    elif strata is not None:
        loss = strata.loss(outputs.float(), batch, cfg)
    else:
        loss = survival_loss(outputs.float(), batch, cfg)
    if anchors is not None and cfg.proximal_mu > 0:
        loss = loss + cfg.proximal_mu * _proximal_term(model, anchors)
    if cfg.l1 > 0:
        loss = loss + cfg.l1 * l1_term(model).to(loss.device)
    return loss


@dataclass
class _Loop:
    """What the optimizer steps of one :func:`train` call share (model, batch stream, optimizer, plan)."""

    model: nn.Module
    batches: Iterator[Batch]
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    plan: _Plan
    device: torch.device
    anchors: Sequence[torch.Tensor] | None
    history: TrainHistory
    strata: _SourceStrata | None = None
    average: _WeightAverage | None = None

    @contextmanager
    def selected_weights(self) -> Iterator[nn.Module]:
        """The model with the weights that validation scores and :func:`train` returns: the average, when one
        is kept, in place of the trained weights for the duration of the block."""
        if self.average is None:
            yield self.model
            return
        with self.average.applied(self.model):
            yield self.model

    def step(self) -> list[float]:
        """One optimizer step over ``cfg.grad_accum`` batches; return their losses, count into ``history``."""
        cfg, history = self.cfg, self.history
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for _ in range(cfg.grad_accum):
            batch = next(self.batches).to(self.device)
            loss = _batch_loss(self.model, batch, cfg, self.device, self.anchors, history, self.strata)
            (loss / cfg.grad_accum).backward()
            losses.append(loss.item())
            history.n_examples_seen += len(batch.case_ids)
        if cfg.max_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        history.lr_last = self.plan.lr(cfg, history.n_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = history.lr_last
        self.optimizer.step()
        if self.average is not None:
            self.average.update(self.model)
        history.n_steps += 1
        return losses

    def epoch(self) -> None:
        """One epoch (fewer steps when ``plan.total_steps`` runs out); its mean loss goes to ``history``."""
        self.model.train()
        losses = []
        for _ in range(min(self.plan.steps_per_epoch, self.plan.total_steps - self.history.n_steps)):
            losses += self.step()
        self.history.epoch_loss.append(float(np.mean(losses)) if losses else float("nan"))


def _validation_metrics(
    model: nn.Module,
    val_data: SurvivalDataset,
    train_data: SurvivalDataset,
    device: torch.device,
    cfg: TrainConfig,
) -> dict[str, float]:
    """Metrics on ``val_data`` with the training data's bins and censoring reference.

    With ``stratify_sources`` and several validation sources, ``c_index_within_sources`` is added: Harrell's
    C over pairs of patients of the same source (what epoch selection then uses)."""
    result = evaluate(
        model,
        val_data,
        bins=train_data.bins,
        device=device,
        train_times=train_data.times,
        train_censorship=train_data.censorship,
        loss_cfg=cfg,
    )
    metrics = dict(result.metrics)
    if cfg.stratify_sources and val_data.n_sources > 1:
        strata = val_data.source_index(result.case_ids)
        try:
            metrics[WITHIN_SOURCES] = stratified_harrell_cindex(
                result.time, result.censorship, result.risk, strata
            )
        except NoComparablePairsError:
            metrics[WITHIN_SOURCES] = math.nan
    return metrics


def _selection_score(metrics: Mapping[str, float], cfg: TrainConfig) -> float:
    """Higher is better: the validation C-index (within sources when stratified), or minus the loss."""
    if cfg.select_on == "val_c_index":
        return metrics.get(WITHIN_SOURCES, metrics["c_index"])
    return -metrics["loss"]


@dataclass
class _WeightAverage:
    """An exponential moving average of a model's parameters (``weight_average="ema"``)."""

    decay: float
    averaged: list[torch.Tensor]

    @classmethod
    def start(cls, model: nn.Module, cfg: TrainConfig) -> _WeightAverage | None:
        """The average of ``model``'s parameters, started at their current values (None: not kept)."""
        if cfg.weight_average == "none":
            return None
        return cls(cfg.ema_decay, [p.detach().clone() for p in model.parameters()])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step: ``average <- decay * average + (1 - decay) * weights``."""
        for average, weight in zip(self.averaged, model.parameters(), strict=True):
            average.lerp_(weight.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> None:
        """Replace ``model``'s parameters by the average."""
        for average, weight in zip(self.averaged, model.parameters(), strict=True):
            weight.copy_(average)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the average inside the block and its own parameters again after it."""
        trained = [p.detach().clone() for p in model.parameters()]
        self.load_into(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, value in zip(model.parameters(), trained, strict=True):
                    weight.copy_(value)


def _finish(
    loop: _Loop,
    best_state: Mapping[str, torch.Tensor] | None,
) -> None:
    """Restore the selected epoch's weights (else the last epoch's, averaged when an average is kept) and
    keep the optimizer state; the optimizer state always belongs to the trained, not the averaged, weights."""
    model, cfg, history = loop.model, loop.cfg, loop.history
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        history.selected_epoch = loop.plan.n_epochs
        if loop.average is not None:
            loop.average.load_into(model)
    if cfg.keep_optimizer_state:
        history.optimizer_state = optimizer_state_dict(loop.optimizer, cfg.optimizer)


def train(
    model: nn.Module,
    train_data: SurvivalDataset,
    cfg: TrainConfig,
    *,
    val_data: SurvivalDataset | None = None,
    global_params: Sequence[torch.Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log_prefix: str = "",
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    run_position: RunPosition | None = None,
) -> TrainHistory:
    """Train ``model`` in place on ``train_data``; return what happened.

    Parameters
    ----------
    model : nn.Module
        From :func:`fedprog.models.create_model`; ``model(batch)`` gives logits (n_bins) or log-risk (1).
    train_data : SurvivalDataset
        Training patients; bags are read lazily, ``max_patches`` of them sampled per patient.
    cfg : TrainConfig
        Optimizer, schedule, loss, batching, seed.
    val_data : SurvivalDataset, optional
        Validation split of the SOURCE data only; with ``cfg.select_on != "last"`` the best epoch is kept.
    global_params : sequence of tensors, optional
        The global model of this round; with ``cfg.proximal_mu > 0`` adds the FedProx proximal term.
    device : str or torch.device, optional
        ``cpu``, ``cuda`` or ``auto``; default ``cfg.device`` (``training.device``).
    optimizer_state : mapping, optional
        ``history.optimizer_state`` of the previous call (same site); used if ``cfg.keep_optimizer_state``.
    run_position : RunPosition, optional
        This call's place in the run (federated round ``r`` of ``R``): the LR schedule continues across calls.
    """
    device = device if isinstance(device, torch.device) else resolve_device(str(device or cfg.device))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    anchors = [p.detach().to(device).clone() for p in global_params] if global_params is not None else None
    loader = _loader(train_data, cfg.batch_size, _sampler(train_data, cfg, generator), cfg.num_workers)
    plan = _plan(cfg, len(loader), run_position or RunPosition())
    strata = _SourceStrata.create(train_data, cfg, device)
    optimizer = _optimizer(model, cfg, optimizer_state)
    history = TrainHistory()
    best_score, best_state = -math.inf, None
    started = time.perf_counter()
    train_data.train()
    loop = _Loop(model, _batches(loader, train_data), optimizer, cfg, plan, device, anchors, history, strata)
    loop.average = _WeightAverage.start(model, cfg)
    for epoch in range(plan.n_epochs):
        loop.epoch()
        message = f"{log_prefix}epoch {epoch + 1}/{plan.n_epochs} loss {history.loss:.4f}"
        if val_data is not None and cfg.select_on != "last" and (epoch + 1) % cfg.eval_every == 0:
            with loop.selected_weights() as scored:  # the average, when one is kept: scored and kept
                metrics = _validation_metrics(scored, val_data, train_data, device, cfg)
                score = _selection_score(metrics, cfg)
                if not math.isnan(score) and score > best_score:
                    best_score, history.selected_epoch = score, epoch + 1
                    best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
            history.val_metrics.append(metrics)
            message += f" val c-index {metrics['c_index']:.3f}"
            if WITHIN_SOURCES in metrics:
                message += f" (within sources {metrics[WITHIN_SOURCES]:.3f})"
        if progress:
            log.info(message)
    _finish(loop, best_state)
    history.seconds = time.perf_counter() - started
    if history.no_event_batches:
        log.info("%s%d training batch(es) had no event: zero Cox loss", log_prefix, history.no_event_batches)
    return history


def eval_batch_size(cfg: TrainConfig, data: SurvivalDataset) -> int:
    """``eval_batch_size`` for WSI bags; ``tabular_eval_batch_size`` where every case has the same tokens.

    A table (or expression alone) gives every case the same token count, so a batch needs no padding and
    gives the same predictions as one case at a time, much faster.
    """
    return (
        cfg.eval_batch_size
        if data.strong_kind == "wsi"
        else max(cfg.eval_batch_size, cfg.tabular_eval_batch_size)
    )


def ordered_loader(data: SurvivalDataset, batch_size: int) -> DataLoader:
    """Every case of ``data`` once, in its order (evaluation, and a site's Newton terms)."""
    return _loader(data, batch_size, sampler=None)


@torch.no_grad()
def predict(
    model: nn.Module, data: SurvivalDataset, *, device: str | torch.device = "cpu", batch_size: int = 1
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Return (case_ids, outputs, risk, survival) for every patient of ``data`` (all patches, eval mode)."""
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    model.to(device).eval()
    was_training = data.training
    data.eval()
    case_ids, outputs = [], []
    try:
        for batch in ordered_loader(data, batch_size):
            batch = batch.to(device)
            outputs.append(model(batch).float().cpu())
            case_ids.extend(batch.case_ids)
    finally:
        data.train(was_training)
    logits = torch.cat(outputs) if outputs else torch.empty(0, 1)
    if logits.shape[1] == 1:
        risk, survival = logits.reshape(-1), torch.empty(len(logits), 0)
    else:
        risk, survival = risk_from_logits(logits), survival_from_logits(logits)
    return case_ids, logits, risk.numpy(), survival.numpy()


def evaluate(
    model: nn.Module,
    data: SurvivalDataset,
    *,
    bins: SurvivalBins,
    device: str | torch.device | None = None,
    train_times: np.ndarray | None = None,
    train_censorship: np.ndarray | None = None,
    loss_cfg: TrainConfig | None = None,
) -> EvalResult:
    """Evaluate ``model`` on every patient of ``data`` with the bins fitted on the training sites.

    Metrics (``fedprog.survival.metrics.evaluate_predictions``): Harrell's C-index, Uno's IPCW C-index and the
    integrated Brier score (these two need ``train_times``/``train_censorship`` as censoring reference), the
    mean time-dependent AUC, the median-split log-rank p-value, and the mean loss. A metric that cannot be
    computed is NaN with its reason logged. ``device`` defaults to ``loss_cfg.device`` (CPU without one).
    """
    cfg = loss_cfg or TrainConfig(device="cpu")
    device = device or cfg.device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    case_ids, logits, risk, survival = predict(
        model, data, device=device, batch_size=eval_batch_size(cfg, data)
    )
    time_ = np.asarray(data.times, dtype=float)
    censorship = np.asarray(data.censorship, dtype=float)
    metrics = evaluate_predictions(
        time_,
        censorship,
        risk,
        survival=survival if survival.shape[1] else None,
        bin_edges=np.asarray(bins.edges) if survival.shape[1] else None,
        train_time=train_times,
        train_censorship=train_censorship,
    )
    metrics["loss"] = _mean_loss(logits, data, bins, cfg)
    return EvalResult(case_ids, risk, survival, time_, censorship, metrics)


def _mean_loss(logits: torch.Tensor, data: SurvivalDataset, bins: SurvivalBins, cfg: TrainConfig) -> float:
    if len(logits) == 0:
        return float("nan")
    time_ = torch.tensor(np.asarray(data.times), dtype=torch.float32)
    censorship = torch.tensor(np.asarray(data.censorship), dtype=torch.float32)
    if logits.shape[1] == 1:
        if (censorship < 1).sum() == 0:
            return float("nan")
        return float(cox_ph_loss(logits.reshape(-1), time_, 1.0 - censorship))
    bin_index = torch.as_tensor(bins.transform(np.asarray(data.times)), dtype=torch.long)
    return float(nll_survival_loss(logits, bin_index, censorship, alpha=cfg.alpha_surv))
