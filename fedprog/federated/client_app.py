"""The fedprog Flower ClientApp: one hospital answers queries, trains and evaluates through fedprog.engine.

Only model weights and aggregate metrics ever leave the site. Messages carry the resolved run configuration
(``fedprog.*`` keys of the ``config`` ConfigRecord), the fitted preprocessing (``fedprog-prep``, JSON) and,
for training, the global weights. A site learns who it is from ``context.node_config``: ``site`` (plus
optional ``data-root``, ``cohort``, ``role``, ``device``) in deployment, ``partition-id`` in simulation (index
into the federation's site table). Datasets are cached per process (a warm Ray actor or a long-lived
``flwr-clientapp``) by site and data signature.

Security: in deployment (``data-root`` in the node config) the data layout comes from the site's own manifest
(``<data-root>/fedprog.yaml``), never from the server's message; every request is held against the site's own
:class:`~fedprog.federated.disclosure.DisclosurePolicy`; ``describe`` first runs the checks of
``fedprog data check`` on the site's cohort; any failure leaves the site as a one-line sanitized error reply
(:func:`fedprog.federated.messages.encode_error`) while the full traceback stays in the site's log.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedprog import engine
from fedprog.config import from_run_config
from fedprog.data import Cohort, DatasetLayout, Site, SurvivalDataset, build_sites, load_cohort
from fedprog.data.check import check_dataset
from fedprog.data.dataset import expression_frame
from fedprog.data.groups import GeneGroups
from fedprog.data.layout import MANIFEST
from fedprog.data.sites import held_back_validation
from fedprog.data.transforms import expression_transform_for, tabular_transform_for
from fedprog.device import client_device
from fedprog.federated import newton
from fedprog.federated.disclosure import DisclosurePolicy
from fedprog.federated.federation import (
    SiteResolutionError,
    derived_seed,
    event_histogram,
    km_aggregates,
    resolve_site_name,
    time_grid,
)
from fedprog.federated.messages import (  # noqa: F401 - the protocol's names, re-exported for callers
    ACTION_KEY,
    CFG_PREFIX,
    DESCRIBE,
    DESCRIBE_METRICS,
    EVAL_METRICS,
    FIT_METRICS,
    FIT_STATS,
    GENES_KEY,
    KM_GRID_KEY,
    PREP_KEY,
    STYLE_BANK_KEY,
    STYLE_KEY,
    TRAIN_METRICS,
    config_record,
    encode_error,
)
from fedprog.federated.site_state import SiteStateStore, site_state_store
from fedprog.federated.style_sharing import install_style_bank, site_style_record
from fedprog.pipeline import Preprocessing, build_model, make_dataset, training_groups

log = logging.getLogger(__name__)

#: Flower's error code for an exception inside a ClientApp (flwr.common.constant.ErrorCode).
CLIENT_APP_RAISED_EXCEPTION = 2
OPTIMIZER_STATE_KEY = "fedprog-optimizer"  # context.state: this site's optimizer moments, kept across rounds
OPTIMIZER_ROUND_KEY = "fedprog-optimizer-round"  # context.state: the round those moments come from


class SiteRefusal(PermissionError):
    """The site refuses a request that breaks the protocol (e.g. fitting statistics from a held-out site)."""


_CONFIGS: dict[str, DictConfig] = {}


def config_from_record(record: Mapping[str, Any]) -> DictConfig:
    """Rebuild the run config from a message's ConfigRecord (cached by content hash)."""
    flat = {key[len(CFG_PREFIX) :]: value for key, value in record.items() if key.startswith(CFG_PREFIX)}
    if not flat:
        raise SiteRefusal("message carries no fedprog configuration (fedprog.* keys)")
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    if digest not in _CONFIGS:
        cfg = from_run_config(flat)
        OmegaConf.set_readonly(cfg, True)  # shared by every message with this content: never changed
        _CONFIGS[digest] = cfg
    return _CONFIGS[digest]


# ------------------------------------------------------------------------------------------ site resolution
@dataclass
class SiteHandle:
    """A resolved site: its layout, loaded cohort, device and its own disclosure limits."""

    site: Site
    layout: DatasetLayout
    cohort: Any
    device: str
    policy: DisclosurePolicy

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings never to send in an error text: the cohort's case ids."""
        return tuple(str(c) for c in self.cohort.labels.index)


_SITES: dict[tuple[str, ...], SiteHandle] = {}
_NODE_SITES: dict[int, SiteHandle] = {}  # node id -> its resolved site (names the site in error replies)
_DATA: dict[tuple[str, ...], tuple[SurvivalDataset | None, SurvivalDataset]] = {}
_FEDERATIONS: dict[tuple[str, ...], tuple[list[Site], dict[str, Cohort]]] = {}
_CHECKED: set[tuple[str, str]] = set()  # (data root, cohort) that passed the data check in this process


def _site_layout(cfg: DictConfig, node_config: Mapping[str, Any]) -> DatasetLayout:
    """The data layout: in deployment the site's own (its manifest, or the server's keys confined to its
    ``data-root``); in simulation the run config's."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(data, dict)
    if "data-root" not in node_config:
        return DatasetLayout.load(data)
    root = Path(str(node_config["data-root"]))
    if (root / MANIFEST).is_file():  # the hospital's own manifest alone says where its files are
        return DatasetLayout.load(root)
    _refuse_paths_outside(data)
    return DatasetLayout.load({**data, "root": str(root)})


def _refuse_paths_outside(data: Any, name: str = "data") -> None:
    """Refuse server-sent layout values that are absolute paths or climb out of the site's ``data-root``."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key != "root":
                _refuse_paths_outside(value, f"{name}.{key}")
    elif isinstance(data, list | tuple):
        for index, value in enumerate(data):
            _refuse_paths_outside(value, f"{name}[{index}]")
    elif isinstance(data, str):
        path = PurePath(data)
        if path.is_absolute() or ".." in path.parts or data.startswith("~"):
            raise SiteRefusal(f"{name}: a path outside this site's data-root is not accepted from the server")


def _federation_name(cfg: DictConfig, node_config: Mapping[str, Any]) -> str | None:
    """The federation file whose ``disclosure:`` limits a simulated site reads (None in deployment)."""
    if "data-root" in node_config or "federation" not in cfg:
        return None
    return str(cfg.federation.get("name") or "") or None


def resolve_site(cfg: DictConfig, context: Context) -> SiteHandle:
    """Which site this node is, with its cohort loaded (cached per process).

    Raises
    ------
    SiteResolutionError
        When the node config names no usable site.
    """
    node_config = dict(context.node_config)
    key = (*_site_key_parts(cfg), json.dumps({k: str(v) for k, v in sorted(node_config.items())}))
    if key not in _SITES:
        fed = json.loads(key[1])
        heldout_list = json.loads(key[2])
        layout = _site_layout(cfg, node_config)
        site, cohort = _resolve(layout, node_config, fed, heldout_list, key)
        device = client_device(str(cfg.training.get("device", "auto")), node_config)
        policy = DisclosurePolicy.load(node_config, _federation_name(cfg, node_config))
        _SITES[key] = SiteHandle(site, layout, cohort, device, policy)
        log.info(
            "node %s is site %s (%s, %d cases)", context.node_id, site.name, site.role, len(site.all_ids)
        )
    _NODE_SITES[context.node_id] = _SITES[key]
    return _SITES[key]


_KEY_PARTS: dict[int, tuple[DictConfig, tuple[str, str, str]]] = {}  # id(read-only cfg) -> (cfg, parts)


def _site_key_parts(cfg: DictConfig) -> tuple[str, str, str]:
    """The config's part of a site's cache key: data, federation and held-out sites as JSON (computed once per
    read-only config, i.e. once per run in a client process, not once per message)."""
    entry = _KEY_PARTS.get(id(cfg))
    if entry is not None and entry[0] is cfg:
        return entry[1]
    data = OmegaConf.to_container(cfg.data, resolve=True)
    fed = OmegaConf.to_container(cfg.federation, resolve=True) if "federation" in cfg else {}
    heldout = cfg.get("heldout")
    parts = (
        json.dumps(data, sort_keys=True, default=str),
        json.dumps(fed, sort_keys=True, default=str),
        json.dumps(None if heldout is None else list(heldout)),
    )
    if OmegaConf.is_readonly(cfg):  # a config that can change is keyed afresh on every call
        _KEY_PARTS[id(cfg)] = (cfg, parts)
    return parts


def _resolve(
    layout: DatasetLayout,
    node_config: Mapping[str, Any],
    fed: Mapping[str, Any],
    heldout: list[str] | None,
    key: tuple[str, ...],
) -> tuple[Site, Cohort]:
    """The site and its loaded cohort: from the node config (deployment) or the federation table."""
    if (
        "site" in node_config and "cohort" in node_config
    ):  # deployment: the node config is the source of truth
        cohort_name = str(node_config["cohort"])
        cohort = load_cohort(layout, cohort_name)
        role = str(node_config.get("role", "train"))
        site = Site(str(node_config["site"]), cohort_name, role, tuple(cohort.labels.index))
        return held_back_validation(site, cohort.labels, fed), cohort  # as build_sites draws it
    sites, cohorts = _federation(layout, fed, heldout, key[:3])
    name = resolve_site_name(node_config, [s.name for s in sites])
    matches = [s for s in sites if s.name == name]
    if not matches:
        raise SiteResolutionError(
            f"site {name!r} (node config) is not in the federation {[s.name for s in sites]}"
        )
    site = matches[0]
    if "role" in node_config:
        site = Site(site.name, site.cohort, str(node_config["role"]), site.case_ids, site.test_ids)
    return site, cohorts[site.cohort]


def check_site_data(handle: SiteHandle) -> None:
    """Run the checks of ``fedprog data check`` on this site's cohort (once per process and cohort).

    Raises
    ------
    CohortError
        The first problem, naming file, column or case (sanitized before it leaves the site).
    """
    key = (str(handle.layout.root), handle.site.cohort)
    if key not in _CHECKED:
        check_dataset(dataclasses.replace(handle.layout, cohorts=(handle.site.cohort,)))
        _CHECKED.add(key)


def _federation(
    layout: DatasetLayout, fed: Mapping[str, Any], heldout: list[str] | None, key: tuple[str, ...]
) -> tuple[list[Site], dict[str, Cohort]]:
    """The site table and its loaded cohorts, built once per process and shared by every node it serves."""
    if key not in _FEDERATIONS:
        names = list(fed.get("cohorts") or layout.cohorts)
        cohorts = {name: load_cohort(layout, name) for name in names}
        _FEDERATIONS[key] = (build_sites(layout, fed, heldout, cohorts=cohorts), cohorts)
    return _FEDERATIONS[key]


def eval_ids(site: Site) -> tuple[str, ...]:
    """Cases a site evaluates on: its local test split when it has one, else all its cases."""
    return site.test_ids if site.test_ids else site.all_ids


def site_datasets(
    cfg: DictConfig, handle: SiteHandle, prep_json: str
) -> tuple[SurvivalDataset | None, SurvivalDataset]:
    """(train dataset or None for a held-out site, evaluation dataset), cached by site and data signature.

    With ``data.site_standardize`` the bags are standardized by this site's own patch statistics, computed
    here from its own cases (held-out sites too), so they never leave the site.
    """
    digest = hashlib.sha256(prep_json.encode()).hexdigest()
    key = (
        handle.site.name,
        str(handle.layout.root),
        digest,
        str(cfg.training.max_patches),
        str(handle.layout.site_standardize),
        str(handle.layout.bag_standardize),
    )
    if key not in _DATA:
        prep = Preprocessing.from_state_dict(json.loads(prep_json))
        site, cohort = handle.site, handle.cohort
        train_ds = (
            site_dataset(cfg, cohort, site, site.case_ids, prep)
            if site.role == "train" and site.case_ids
            else None
        )
        _DATA[key] = (train_ds, site_dataset(cfg, cohort, site, eval_ids(site), prep))
    return _DATA[key]


def site_dataset(
    cfg: DictConfig, cohort: Cohort, site: Site, ids: tuple[str, ...], prep: Preprocessing
) -> SurvivalDataset:
    """The dataset of ``ids`` of ``site`` with the federation's preprocessing (standardized by the site's own
    cases with ``data.site_standardize``); the simulated rotation evaluates held-out sites with it too."""
    return make_dataset(
        cohort,
        ids,
        prep,
        max_patches=cfg.training.max_patches,
        seed=int(cfg.seed),
        site_cases=site.all_ids,  # site standardization: this site's own cases only
    )


def evaluate_model(
    cfg: DictConfig, data: SurvivalDataset, arrays: ArrayRecord, device: str
) -> engine.EvalResult:
    """The global model ``arrays`` evaluated on a site's ``data`` (the ``evaluate`` handler's computation)."""
    model = _model(cfg, data, arrays)
    return engine.evaluate(model, data, bins=data.bins, device=device, loss_cfg=_train_config(cfg))


# ------------------------------------------------------------------------------------------ model helpers
def _model(cfg: DictConfig, data: SurvivalDataset, arrays: ArrayRecord) -> nn.Module:
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), data, loss=str(cfg.training.loss))
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    return model


def _train_config(cfg: DictConfig, **overrides: Any) -> engine.TrainConfig:
    """The engine's settings: ``cfg.training`` (every key is the engine's; an unknown one is refused)."""
    return engine.TrainConfig.from_cfg(OmegaConf.to_container(cfg.training, resolve=True), **overrides)


def _strong_dim(handle: SiteHandle) -> int | None:
    """Feature width of the strong modality: one bag header for WSI, 1 without a strong modality, None for a
    table (its width is the fitted ``TabularTransform.n_features``, known only after the federated fit)."""
    kind = handle.layout.strong_kind
    if kind is None:
        return 1
    if kind == "wsi":
        from fedprog.data.bags import bag_shape

        case = next(c for c in handle.site.case_ids if c in handle.cohort.bag_paths)
        return int(bag_shape(handle.cohort.bag_paths[case][0], case_id=case, cohort=handle.cohort.name)[1])
    return None


def _fit_stats(cfg: DictConfig, handle: SiteHandle, genes_json: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Aggregates of the site's TRAINING cases for the federated fit: (metrics, info JSON).

    Metrics: the event-time histogram and, with ``genes_json`` (the server's gene groups), the per-gene
    expression count/sum/sum of squares. Info: the expression genes and transform settings, and for a tabular
    strong modality the ``TabularTransform.moments`` (per-column counts, sums, sums of squares, missing
    counts and level counts) with the transform settings. No patient-level value.
    """
    ids = list(handle.site.case_ids)
    labels = handle.cohort.labels
    n_events = int((labels.loc[ids, "censorship"] == 0).sum())
    handle.policy.check_counts(f"site {handle.site.name}: fit statistics", len(ids), n_events)
    handle.policy.check_histogram(float(cfg.fit.time_grid_step))
    grid = time_grid(float(cfg.fit.time_grid_max), float(cfg.fit.time_grid_step))
    hist = event_histogram(
        labels.loc[ids, "survival_months"].to_numpy(), labels.loc[ids, "censorship"].to_numpy(), grid
    )
    metrics: dict[str, Any] = {"event-hist": hist.tolist()}
    info: dict[str, Any] = {}
    if genes_json:
        state = json.loads(genes_json)
        groups = GeneGroups(list(state["names"]), [list(g) for g in state["genes"]])
        transform = expression_transform_for(handle.layout)
        moments = transform.moments(expression_frame(handle.cohort, groups, ids))
        metrics.update(
            {
                "expr-count": int(moments["count"]),
                "expr-sum": np.asarray(moments["sum"], dtype=float).tolist(),
                "expr-sumsq": np.asarray(moments["sumsq"], dtype=float).tolist(),
            }
        )
        info["genes"] = moments["genes"]
        info["transform"] = {
            "method": transform.method,
            "clip": transform.clip,
            "z_clip": transform.z_clip,
            "min_std": transform.min_std,
        }
    tabular = tabular_transform_for(handle.layout)
    if tabular is not None:
        table = handle.cohort.tables[str(handle.layout.strong)].loc[ids]
        info["tabular"] = tabular.moments(table)
        info["tabular-settings"] = {
            "categorical": tabular.categorical,
            "standardize": tabular.standardize,
            "min_std": tabular.min_std,
        }
    return metrics, info


# ------------------------------------------------------------------------------------------ handlers
def guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Wrap a handler: any exception becomes an error reply with the error class and a sanitized one-line
    reason (no traceback, no absolute path, no case id); the full traceback goes to this site's log only."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as error:  # noqa: BLE001 - every failure leaves the site as a sanitized reply
            return error_reply(msg, context, error)

    return run


def error_reply(msg: Message, context: Context, error: Exception) -> Message:
    """The sanitized error reply for ``error``; the traceback goes to this site's own log only.

    Module-level on purpose: Ray pickles the nested ``guarded`` closure by value, and a module global read
    there would be a stale copy; this function is pickled by reference and sees the live site cache.
    """
    handle = _NODE_SITES.get(context.node_id)
    site = handle.site.name if handle else _claimed_site(context)
    reason = encode_error(site, error, secrets=handle.secrets if handle else ())
    if "partition-id" in context.node_config:  # simulation: the site's log is the user's console
        log.warning(
            "site %s: %s request failed: %s", site, msg.metadata.message_type, json.loads(reason)["reason"]
        )
        log.debug("site %s: traceback", site, exc_info=error)
    else:  # deployment: the full traceback stays in this hospital's own log
        log.error("site %s: %s request failed", site, msg.metadata.message_type, exc_info=error)
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _claimed_site(context: Context) -> str | None:
    """The site this node says it is before its site could be resolved (deployment name or partition)."""
    node_config = context.node_config
    if "site" in node_config:
        return str(node_config["site"])
    return f"partition-{node_config['partition-id']}" if "partition-id" in node_config else None


def handle_query(msg: Message, context: Context) -> Message:
    """``describe``: site, role, counts (after the data check); ``fit-stats``: aggregates to fit bins and
    transforms (training sites, within the site's disclosure limits)."""
    record = msg.content.config_records["config"]
    cfg = config_from_record(record)
    handle = resolve_site(cfg, context)
    action = str(record.get(ACTION_KEY, DESCRIBE))
    if action == DESCRIBE:
        check_site_data(handle)
        info, metrics = _describe(handle)
    elif action != FIT_STATS:
        raise SiteRefusal(f"site {handle.site.name}: unknown query action {action[:40]!r}")
    elif handle.site.role != "train":
        raise SiteRefusal(
            f"site {handle.site.name} is held out: it never contributes to fitting bins or transforms"
        )
    else:
        metrics, info = _fit_stats(cfg, handle, str(record.get(GENES_KEY) or ""))
    reply = {"info": ConfigRecord({"json": json.dumps(info)}), "metrics": MetricRecord(metrics)}
    return Message(RecordDict(reply), reply_to=msg)


def _describe(handle: SiteHandle) -> tuple[dict[str, Any], dict[str, Any]]:
    """(info, metrics) of the ``describe`` reply: who the site is, its counts, genes of a training site."""
    site, labels = handle.site, handle.cohort.labels
    ids = list(site.all_ids)
    n_events = int((labels.loc[ids, "censorship"] == 0).sum())
    info: dict[str, Any] = {"site": site.name, "role": site.role, "cohort": site.cohort}
    metrics = {"n-cases": len(ids), "n-events": n_events, "n-train-cases": len(site.case_ids)}
    if site.role == "train":
        groups = training_groups(handle.layout, handle.cohort.genes)
        info["genes"] = [str(g) for g in handle.cohort.genes]
        info["groups"] = None if groups is None else {"names": groups.names, "genes": groups.genes}
        info["strong-kind"] = handle.layout.strong_kind or "none"
        info["gene-policy"] = handle.layout.gene_policy
        strong_dim = _strong_dim(handle)
        if strong_dim is not None:
            metrics["strong-dim"] = strong_dim
    return info, metrics


def train_arrays(
    arrays: ArrayRecord, config: ConfigRecord, context: Context
) -> tuple[ArrayRecord, MetricRecord]:
    """Train the global model on this site's training cases with the engine; weights and aggregates out."""
    trained, metrics, _ = train_site(arrays, config, context)
    return trained, metrics


def train_site(
    arrays: ArrayRecord, config: ConfigRecord, context: Context, style_bank: ConfigRecord | None = None
) -> tuple[ArrayRecord, MetricRecord, ConfigRecord | None]:
    """:func:`train_arrays`, plus the shared styles: installs ``style_bank`` (other sites' pooled styles) in
    CADE before training and returns this site's aggregate style summaries (None: nothing to share)."""
    cfg = config_from_record(config)
    handle = resolve_site(cfg, context)
    if handle.site.role != "train":
        raise SiteRefusal(f"site {handle.site.name} is held out and never trains")
    train_ds, _ = site_datasets(cfg, handle, str(config[PREP_KEY]))
    if train_ds is None:
        raise SiteRefusal(f"site {handle.site.name} has no training cases")
    handle.policy.check_counts(f"site {handle.site.name}: training", len(train_ds))
    if str(cfg.strategy.name) == newton.NAME:
        return (*newton_reply(cfg, handle, train_ds, arrays), None)  # no local training, no styles
    server_round = int(config.get("server-round", 0))
    seed = derived_seed(int(cfg.seed), server_round, handle.site.name)
    mu = float(config.get("proximal-mu", cfg.training.get("proximal_mu", 0.0)))
    train_cfg = _train_config(cfg, seed=seed, proximal_mu=mu)
    train_ds.seed = (
        seed  # patch sampling depends on (seed, epoch, case): a function of (run seed, round, site)
    )
    train_ds.set_epoch(0)
    model = _model(cfg, train_ds, arrays)
    install_style_bank(cfg, model, style_bank, seed, train_ds)
    anchors = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    store, kept = None, None
    if train_cfg.keep_optimizer_state:
        store = site_state_store(cfg, context.node_config, handle.site.name)
        kept = _kept_optimizer_state(context, store, server_round)
    rounds = max(int(cfg.rounds), server_round)  # a resumed or extended run keeps a valid schedule position
    history = engine.train(
        model,
        train_ds,
        train_cfg,
        global_params=anchors,
        device=handle.device,
        progress=False,
        log_prefix=f"[{handle.site.name} r{server_round}] ",
        optimizer_state=kept,
        run_position=engine.RunPosition(max(server_round - 1, 0), rounds),
    )
    if history.optimizer_state is not None:
        _keep_optimizer_state(context, store, server_round, history.optimizer_state)
    model.to("cpu")
    metrics = MetricRecord(
        {
            "num-examples": len(train_ds),
            "n-events": int(train_ds.n_events),
            "train-loss": float(history.loss),
            "n-steps": int(history.n_steps),
            "seconds": float(history.seconds),
        }
    )
    last = server_round >= rounds  # no round follows: nothing would use the styles, so none are sent
    style = None if last else site_style_record(cfg, model, len(train_ds), handle.policy, handle.site.name)
    return ArrayRecord(model.state_dict()), metrics, style


def newton_reply(
    cfg: DictConfig, handle: SiteHandle, train_ds: SurvivalDataset, arrays: ArrayRecord
) -> tuple[ArrayRecord, MetricRecord]:
    """``strategy=newton``: this site's Cox terms at the global weights (no local training).

    Refused by a site with no more training cases than the model has weights: its Hessian (rank at most its
    number of cases) would then be no aggregate but close to a description of its cases' features.
    """
    started = time.perf_counter()
    model = _model(cfg, train_ds, arrays)
    n_weights = sum(p.numel() for p in model.parameters())
    if len(train_ds) <= n_weights:
        raise SiteRefusal(
            f"site {handle.site.name}: {len(train_ds)} training cases for a model of {n_weights} weights; "
            "a Newton reply needs more cases than weights"
        )
    batch_size = int(cfg.training.tabular_eval_batch_size)  # linear_cox: a table, no padding
    terms = newton.site_terms(model, train_ds, device=handle.device, batch_size=batch_size)
    metrics = {
        "num-examples": len(train_ds),
        "n-events": terms.n_events,
        "train-loss": terms.value / max(terms.n_events, 1),
        "cox-value": terms.value,
        "n-steps": 0,
        "seconds": time.perf_counter() - started,
    }
    return ArrayRecord(newton.numpy_arrays(terms.arrays())), MetricRecord(metrics)


def _keep_optimizer_state(
    context: Context, store: SiteStateStore | None, server_round: int, state: dict[str, torch.Tensor]
) -> None:
    """Keep this site's optimizer state for its next training round: in its state folder when it has one,
    else in the node context (a deployed site without ``state-dir``).

    Not both: Flower's simulation ships the node context to the client process and back with every message,
    and the moments are twice the model's size, so a context that carried them would double what every
    message moves (and the server would hold every site's moments).
    """
    if store is not None:
        store.save(server_round, state)
        return
    context.state[OPTIMIZER_STATE_KEY] = ArrayRecord(state)
    context.state[OPTIMIZER_ROUND_KEY] = ConfigRecord({"round": server_round})


def _kept_optimizer_state(
    context: Context, store: SiteStateStore | None, server_round: int
) -> dict[str, torch.Tensor] | None:
    """This site's optimizer state from its last training round before ``server_round`` (where
    :func:`_keep_optimizer_state` put it); None when it has none (a first round, a lost context)."""
    if store is not None:
        state = store.load_before(server_round)
    else:
        kept = context.state.array_records.get(OPTIMIZER_STATE_KEY)
        kept_round = int(context.state.config_records.get(OPTIMIZER_ROUND_KEY, {}).get("round", -1))
        state = kept.to_torch_state_dict() if kept is not None and kept_round < server_round else None
    if state is None and server_round > 1:
        log.warning("round %d: no optimizer state kept from an earlier round; fresh moments", server_round)
    return state


def handle_train(msg: Message, context: Context) -> Message:
    """Flower ``train`` handler: :func:`train_site` on the message's weights, config and style bank."""
    bank = msg.content.config_records.get(STYLE_BANK_KEY)
    arrays, metrics, style = train_site(msg.content["arrays"], msg.content["config"], context, bank)
    reply = {"arrays": arrays, "metrics": metrics, **({STYLE_KEY: style} if style is not None else {})}
    return Message(RecordDict(reply), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Flower ``evaluate`` handler: metrics of the global model on this site's evaluation cases."""
    config = msg.content["config"]
    cfg = config_from_record(config)
    handle = resolve_site(cfg, context)
    _, eval_ds = site_datasets(cfg, handle, str(config[PREP_KEY]))
    handle.policy.check_counts(f"site {handle.site.name}: evaluation", len(eval_ds))
    grid = np.asarray(list(config[KM_GRID_KEY]), dtype=float) if KM_GRID_KEY in config else None
    if grid is not None:  # refuse before any work: the KM request is checked against the site's limits
        handle.policy.check_km_grid(grid)
        handle.policy.check_counts(f"site {handle.site.name}: KM curves", len(eval_ds), int(eval_ds.n_events))
    result = evaluate_model(cfg, eval_ds, msg.content["arrays"], handle.device)
    m = result.metrics
    metrics: dict[str, Any] = {
        "num-examples": int(m.get("n", len(eval_ds))),
        "n-events": int(m.get("n_events", eval_ds.n_events)),
        "c-index": float(m.get("c_index", float("nan"))),
        "c-index-ipcw": float(m.get("c_index_ipcw", float("nan"))),
        "ibs": float(m.get("ibs", float("nan"))),
        "mean-auc": float(m.get("mean_auc", float("nan"))),
        "logrank-p": float(m.get("logrank_p", float("nan"))),
        "loss": float(m.get("loss", float("nan"))),
        "missing-genes": len(eval_ds.missing_genes),  # imputed at the training mean (data.gene_policy)
    }
    if grid is not None:
        km = km_aggregates(
            result.time, result.censorship, result.risk, grid, min_at_risk=handle.policy.km_min_at_risk
        )
        metrics.update(km)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _build_app() -> ClientApp:
    mods: list[Any] = []
    try:
        from fedprog.federated import privacy
    except ImportError as error:  # the privacy module is optional (another package)
        log.debug("privacy module unavailable, ClientApp without privacy mods: %s", error)
    else:
        mods = [
            privacy.secagg_dispatch_mod(privacy.make_secagg_client_app(train_arrays)),
            privacy.privacy_mod,
        ]
    client = ClientApp(mods=mods)
    client.query()(HANDLERS["query"])
    client.train()(HANDLERS["train"])
    client.evaluate()(HANDLERS["evaluate"])
    return client


#: The guarded handlers the ClientApp registers, by message type (tests call them through DirectGrid).
HANDLERS = {
    "query": guarded(handle_query),
    "train": guarded(handle_train),
    "evaluate": guarded(handle_evaluate),
}

#: The ClientApp named in pyproject.toml (``fedprog.federated.client_app:app``).
app = _build_app()


def clear_caches() -> None:
    """Forget cached configs, sites and datasets (tests; a new dataset at the same path)."""
    _CONFIGS.clear()
    _KEY_PARTS.clear()
    _SITES.clear()
    _NODE_SITES.clear()
    _CHECKED.clear()
    _DATA.clear()
    _FEDERATIONS.clear()
