"""The fedprog Flower ServerApp: query sites, fit preprocessing from aggregates, run rounds, checkpoint.

One ServerApp serves simulation and deployment. Its run config holds ``config-name`` (default ``simulate``),
``overrides`` (space-separated Hydra overrides) and ``config-file`` (a resolved YAML; wins when set)::

    flwr run . --run-config "overrides='rounds=3 strategy=fedprox'"

A run: (1) a ``describe`` query asks every node for its site, role and counts; (2) a ``fit-stats`` query asks
the TRAINING sites only for aggregates of their training split (event-time histogram, per-gene expression
moments, and for a tabular strong modality per-column moments and level counts) from which the survival bins,
the expression transform and the ``TabularTransform`` are fitted; (3) each round the held-out-aware strategy
sends the global model to training nodes only, screens and aggregates their updates, and every site evaluates
the global model every ``eval_every`` rounds on its local test split (``Site.test_ids``; all its cases when it
has none); (4) a checkpoint is written after every round; (5) outputs go to ``out``.

Privacy (``privacy`` group): ``central_dp`` / ``local_dp`` wrap the strategy (``privacy.wrap_strategy``); the
spent (epsilon, delta) goes into every round's record, and the accountant state and the DP-noise RNG stream
into every checkpoint. ``secagg`` runs the training rounds through Flower's legacy SecAgg+ workflow
(``privacy.run_secagg``, FedAvg/FedProx only) with the same per-round evaluation and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedprog.config import load_config, to_container
from fedprog.data import CohortError, ExpressionTransform, GeneGroups, SurvivalBins, TabularTransform
from fedprog.federated.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fedprog.federated.client_app import ACTION_KEY, GENES_KEY, KM_GRID_KEY, PREP_KEY, config_record
from fedprog.federated.federation import (
    FitError,
    SiteInfo,
    assign_roles,
    bin_edges_from_histogram,
    pool_moments,
    time_grid,
)
from fedprog.federated.strategy import (
    FederationError,
    HeldoutAwareMixin,
    TooFewSitesError,
    arrays_to_numpy,
    build_strategy,
    numpy_to_arrays,
)
from fedprog.models import create_model
from fedprog.pipeline import Preprocessing, n_outputs_for
from fedprog.results import run_folder

log = logging.getLogger(__name__)


class _NullAudit:
    """Stands in for the audit log when ``audit.enabled`` is false."""

    def append(self, event: str, **fields: Any) -> None:
        """Do nothing."""


def config_from_run_config(run_config: Mapping[str, Any]) -> DictConfig:
    """The run's config: ``config-file`` (resolved YAML) when set, else ``config-name`` + ``overrides``."""
    path = str(run_config.get("config-file") or "")
    if path:
        if not Path(path).is_file():
            raise FederationError(f"run config config-file={path!r}: no such file")
        return OmegaConf.load(path)  # type: ignore[return-value]
    name = str(run_config.get("config-name") or "simulate")
    overrides = shlex.split(str(run_config.get("overrides") or ""))
    cfg = load_config(name, overrides)
    cfg.out = str(run_folder(name, cfg.out))  # out=null: a new runs/<name>/<time stamp>/ folder
    return OmegaConf.create(to_container(cfg))


def _sha(arrays: Mapping[str, np.ndarray]) -> str:
    from fedprog.deploy.audit import sha256_arrays

    return sha256_arrays(arrays)


def _audit_log(cfg: DictConfig) -> Any:
    audit = cfg.get("audit") or {}
    if not audit.get("enabled", False):
        return _NullAudit()
    from fedprog.deploy.audit import AuditLog

    return AuditLog(str(audit.get("path") or Path(cfg.out) / "audit.jsonl"))


# ------------------------------------------------------------------------------------------------ queries
def _wait_for_nodes(grid: Grid, cfg: DictConfig) -> list[int]:
    """Node ids once ``expected_sites`` nodes are connected (or the count is stable), at most the timeout."""
    expected = cfg.get("expected_sites")
    deadline = time.monotonic() + float(cfg.get("node_wait_timeout", 120))
    settle = float(cfg.get("node_settle_s", 3.0))
    last, stable_since = -1, time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) != last:
            last, stable_since = len(nodes), now
        if expected is not None and len(nodes) >= int(expected):
            return nodes
        if expected is None and nodes and now - stable_since >= settle:
            return nodes
        if now > deadline:
            if not nodes:
                raise FederationError(
                    f"no site connected within node_wait_timeout={cfg.get('node_wait_timeout')} s"
                )
            log.warning("only %d of %s expected site(s) connected; going on with them", len(nodes), expected)
            return nodes
        time.sleep(0.2)


def _query(grid: Grid, nodes: Sequence[int], record: ConfigRecord, timeout: float) -> dict[int, Message]:
    messages = [
        Message(content=RecordDict({"config": record}), message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=timeout)
    out = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("query to node %d failed: %s", node, reply.error.reason)
            continue
        out[node] = reply
    return out


def _info(reply: Message) -> dict[str, Any]:
    return json.loads(str(reply.content.config_records["info"]["json"]))


def describe_sites(
    grid: Grid, nodes: Sequence[int], cfg: DictConfig
) -> tuple[list[SiteInfo], dict[str, dict]]:
    """Ask each node who it is; return the site table and each training site's extra info (genes, groups)."""
    replies = _query(grid, nodes, config_record(cfg, **{ACTION_KEY: "describe"}), float(cfg.round_timeout))
    infos, extra = [], {}
    for node, reply in sorted(replies.items()):
        info = _info(reply)
        metrics = reply.content.metric_records["metrics"]
        infos.append(
            SiteInfo(
                node,
                info["site"],
                info["role"],
                info["cohort"],
                int(metrics["n-cases"]),
                int(metrics["n-events"]),
            )
        )
        extra[info["site"]] = {**info, "strong-dim": metrics.get("strong-dim")}
    heldout = cfg.get("heldout")
    return assign_roles(infos, None if heldout is None else list(heldout)), extra


def fit_preprocessing(
    grid: Grid, cfg: DictConfig, train_sites: Sequence[SiteInfo], extra: Mapping[str, Mapping[str, Any]]
) -> Preprocessing:
    """Fit groups, expression/tabular transforms and bins from training-site aggregates (never held-out ones).

    The ``fit-stats`` query returns, per training site: the event-time histogram (bins), per-gene expression
    count/sum/sum of squares (``ExpressionTransform.from_moments``) when the data have expression, and for a
    tabular strong modality the per-column moments and level counts (``TabularTransform.from_moments``).

    Raises
    ------
    FitError
        A training site sent nothing, or the sites disagree on transform settings or table columns.
    """
    names = [s.site for s in train_sites]
    groups = _common_groups(names, extra)
    genes_json = json.dumps({"names": groups.names, "genes": groups.genes}) if groups is not None else ""
    record = config_record(cfg, **{ACTION_KEY: "fit-stats", GENES_KEY: genes_json})
    replies = _query(grid, [s.node_id for s in train_sites], record, float(cfg.round_timeout))
    missing = sorted(set(names) - {s.site for s in train_sites if s.node_id in replies})
    if missing:
        raise FitError(f"training site(s) {missing} sent no fitting statistics; cannot fit the preprocessing")
    grid_edges = time_grid(float(cfg.fit.time_grid_max), float(cfg.fit.time_grid_step))
    hist = np.zeros(len(grid_edges) - 1)
    moments, tables, infos = [], [], {}
    for site in train_sites:
        metrics = replies[site.node_id].content.metric_records["metrics"]
        hist += np.asarray(metrics["event-hist"], dtype=float)
        info = infos[site.site] = _info(replies[site.node_id])
        if groups is not None:
            moments.append(
                {
                    "count": metrics["expr-count"],
                    "sum": metrics["expr-sum"],
                    "sumsq": metrics["expr-sumsq"],
                    "genes": info["genes"],
                }
            )
        if "tabular" in info:
            tables.append(info["tabular"])
    bins = SurvivalBins(bin_edges_from_histogram(hist, grid_edges, int(cfg.n_bins)))
    expression = None
    if groups is not None:
        settings = _same_settings(infos, "transform", "expression-transform")
        pooled = pool_moments(moments)
        expression = ExpressionTransform.from_moments(
            pooled["count"], pooled["sum"], pooled["sumsq"], genes=pooled["genes"], **settings
        )
    strong = None
    if tables:
        if len(tables) != len(train_sites):
            lacking = sorted(name for name, info in infos.items() if "tabular" not in info)
            raise FitError(f"training site(s) {lacking} sent no tabular moments while others did")
        settings = _same_settings(infos, "tabular-settings", "tabular-transform")
        try:
            strong = TabularTransform.from_moments(TabularTransform.merge_moments(tables), **settings)
        except CohortError as error:
            raise FitError(f"training sites {names}: tabular transform: {error}") from error
    log.info(
        "preprocessing fitted from the aggregates of %d training site(s) %s: %s%s",
        len(names),
        names,
        bins,
        "" if strong is None else f", {strong.n_features} tabular features",
    )
    return Preprocessing(groups=groups, expression=expression, strong=strong, bins=bins)


def _common_groups(names: Sequence[str], extra: Mapping[str, Mapping[str, Any]]) -> GeneGroups | None:
    """The gene groups restricted to the genes every training site has (None without expression)."""
    first = extra[names[0]]
    if first.get("groups") is None:
        return None
    common = set(first["genes"])
    for name in names[1:]:
        common &= set(extra[name]["genes"])
    ordered = [g for g in first["genes"] if g in common]
    return GeneGroups(list(first["groups"]["names"]), [list(g) for g in first["groups"]["genes"]]).restrict(
        ordered
    )


def _same_settings(infos: Mapping[str, Mapping[str, Any]], key: str, what: str) -> dict[str, Any]:
    """The transform settings every training site reported under ``key`` (they must agree)."""
    seen = {site: json.dumps(info.get(key), sort_keys=True) for site, info in infos.items()}
    if len(set(seen.values())) != 1:
        raise FitError(f"training sites use different {what} settings: {seen}")
    return dict(json.loads(next(iter(seen.values()))))


def initial_weights(
    cfg: DictConfig, prep: Preprocessing, strong_kind: str, strong_dim: int
) -> dict[str, np.ndarray]:
    """The seeded initial global model (same builder as the clients: ``fedprog.models.create_model``)."""
    torch.manual_seed(int(cfg.seed))
    group_index = prep.groups.indices(prep.groups.gene_order) if prep.groups is not None else []
    model = create_model(
        OmegaConf.to_container(cfg.model, resolve=True),
        group_index=group_index,
        strong_kind=strong_kind,
        strong_dim=int(strong_dim),
        n_outputs=n_outputs_for(str(cfg.training.loss), prep.bins),
    )
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------- rounds
@dataclass
class RunState:
    """What the server accumulates over a run (per-site rows, rejections, KM aggregates, round summaries)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    km: dict[str, dict[str, Any]] = field(default_factory=dict)


def _eval_rows(
    server_round: int, per_site: Mapping[str, Mapping[str, Any]], roles: Mapping[str, str]
) -> list[dict]:
    rows = []
    for site, m in sorted(per_site.items()):
        rows.append(
            {
                "round": server_round,
                "site": site,
                "role": roles.get(site, "?"),
                "c_index": float(m.get("c-index", math.nan)),
                "n": int(m.get("num-examples", 0)),
                "n_events": int(m.get("n-events", 0)),
                "loss": float(m.get("loss", math.nan)),
                "c_index_ipcw": float(m.get("c-index-ipcw", math.nan)),
                "ibs": float(m.get("ibs", math.nan)),
            }
        )
    return rows


def role_summary(rows: Sequence[Mapping[str, Any]], role: str) -> dict[str, float]:
    """Event-weighted mean C-index (and example-weighted loss) over the sites of one role in ``rows``.

    ``c_index_site_mean`` is the unweighted mean over the sites with a finite C-index (FLamby's benchmark
    aggregation), reported beside the event-weighted headline for comparison with published numbers.
    """
    from fedprog.survival.metrics import event_weighted_mean

    chosen = [r for r in rows if r["role"] == role]
    if not chosen:
        return {"c_index": math.nan, "n": 0, "n_events": 0, "n_sites": 0}
    c_values = [r["c_index"] for r in chosen]
    events = [r["n_events"] for r in chosen]
    losses = [(r["loss"], r["n"]) for r in chosen if math.isfinite(r["loss"]) and r["n"] > 0]
    finite = [float(c) for c in c_values if math.isfinite(c)]
    return {
        "c_index": event_weighted_mean(c_values, events),
        # FLamby's aggregation (unweighted mean over the sites' local test sets), for comparison only
        "c_index_site_mean": sum(finite) / len(finite) if finite else math.nan,
        "c_index_ipcw": event_weighted_mean([r["c_index_ipcw"] for r in chosen], events),
        "loss": sum(v * n for v, n in losses) / sum(n for _, n in losses) if losses else math.nan,
        "n": int(sum(r["n"] for r in chosen)),
        "n_events": int(sum(events)),
        "n_sites": len(chosen),
    }


def run_federation(grid: Grid, cfg: DictConfig, context: Context | None = None) -> dict[str, Any]:
    """Run the whole federation on ``grid`` and write the outputs to ``cfg.out``; returns the results dict.

    ``context`` is the ServerApp's context; only ``privacy.mode=secagg`` needs it (Flower's legacy
    workflow keeps its state there), and a fresh one is made when it is None.
    """
    from fedprog.federated.simulation import write_outputs

    checkpoint = load_checkpoint(cfg.resume) if cfg.get("resume") else None
    if checkpoint is not None:
        resume = str(cfg.resume)
        cfg = OmegaConf.create(checkpoint.config)
        cfg.resume = resume
        log.info("resuming from %s after round %d", resume, checkpoint.server_round)
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    mode = _privacy_mode(cfg)
    audit = _audit_log(cfg)
    audit.append(
        "run_started",
        strategy=str(cfg.strategy.name),
        rounds=int(cfg.rounds),
        seed=int(cfg.seed),
        resume=str(cfg.get("resume")),
        privacy=mode,
    )

    nodes = _wait_for_nodes(grid, cfg)
    sites, extra = describe_sites(grid, nodes, cfg)
    for s in sites:
        audit.append(
            "site_described",
            site=s.site,
            role=s.role,
            node_id=s.node_id,
            n_cases=s.n_cases,
            n_events=s.n_events,
        )
    train_sites = [s for s in sites if s.role == "train"]
    roles = {s.site: s.role for s in sites}
    if len(train_sites) < int(cfg.min_train_sites):
        raise TooFewSitesError(
            f"{len(train_sites)} training site(s) answered ({[s.site for s in train_sites]}), "
            f"min_train_sites={cfg.min_train_sites}"
        )
    if checkpoint is not None:
        prep = Preprocessing.from_state_dict(checkpoint.federation["prep"])
        arrays = checkpoint.arrays
        restore_rng(checkpoint.rng)
        state = RunState(**checkpoint.federation.get("state", {}))
        start = checkpoint.server_round
    else:
        prep = fit_preprocessing(grid, cfg, train_sites, extra)
        first = extra[train_sites[0].site]
        strong_dim = prep.strong.n_features if prep.strong is not None else int(first.get("strong-dim") or 1)
        arrays = initial_weights(cfg, prep, str(first.get("strong-kind") or "none"), strong_dim)
        state = RunState()
        start = 0
    prep_json = json.dumps(prep.state_dict())
    audit.append(
        "preprocessing",
        bins=prep.bins.to_dict()["edges"],
        fitted_on=[s.site for s in train_sites],
        n_genes=0 if prep.groups is None else len(prep.groups.gene_order),
        n_tabular_features=0 if prep.strong is None else prep.strong.n_features,
    )

    strategy = build_strategy(
        OmegaConf.to_container(cfg.strategy, resolve=True),
        weighting=str(cfg.weighting),
        min_train_sites=int(cfg.min_train_sites),
        max_update_norm=cfg.get("max_update_norm"),
    )
    inner: HeldoutAwareMixin = strategy
    inner.set_sites({s.node_id: s.site for s in train_sites}, {s.node_id: s.site for s in sites})
    if checkpoint is not None:
        inner.load_state_dict(checkpoint.strategy_state)
    strategy = _with_privacy(strategy, cfg, len(train_sites))
    noise_rng = None
    if mode in DP_MODES:
        from fedprog.federated.privacy import NoiseRng, load_privacy_state

        saved = checkpoint.federation.get("privacy", {}) if checkpoint is not None else {}
        if checkpoint is not None:
            load_privacy_state(strategy, saved)
        noise_rng = NoiseRng(saved.get("noise_rng"))

    def save(server_round: int) -> None:
        federation = {
            "prep": prep.state_dict(),
            "sites": [s.to_dict() for s in sites],
            "state": state.__dict__,
        }
        if mode in DP_MODES:
            from fedprog.federated.privacy import privacy_state

            federation["privacy"] = {**privacy_state(strategy), "noise_rng": noise_rng.state_dict()}
        save_checkpoint(
            out / CHECKPOINT_DIR,
            Checkpoint(
                server_round=server_round,
                arrays=arrays,
                strategy_state=inner.state_dict(),
                rng=capture_rng(),
                config=to_container(cfg),
                federation=federation,
            ),
            keep=int(cfg.checkpoint.keep),
        )

    if start == 0:
        save(0)
    rounds = int(cfg.rounds)
    base = {PREP_KEY: prep_json}
    km_grid = np.linspace(0.0, float(cfg.report.km_grid_max), int(cfg.report.km_grid_points)).tolist()

    def finish_round(
        server_round: int, current: dict[str, np.ndarray], summary: dict[str, Any], started: float
    ) -> None:
        """After the aggregate ``current`` of ``server_round``: privacy, evaluation, checkpoint."""
        nonlocal arrays
        arrays = current
        if mode in DP_MODES:
            from fedprog.federated.privacy import privacy_spent

            spent = privacy_spent(strategy)
            summary["privacy"] = {"epsilon": spent["epsilon"], "delta": spent["delta"]}
        last = server_round == rounds
        if server_round % int(cfg.eval_every) == 0 or last:
            eval_cfg = config_record(cfg, **base, **({KM_GRID_KEY: km_grid} if last else {}))
            eval_messages = list(
                strategy.configure_evaluate(server_round, numpy_to_arrays(arrays), eval_cfg, grid)
            )
            eval_replies = list(grid.send_and_receive(eval_messages, timeout=float(cfg.round_timeout)))
            strategy.aggregate_evaluate(server_round, eval_replies)
            rows = _eval_rows(server_round, inner.last_eval, roles)
            for row in rows:
                row.update({k: v for k, v in summary.get("privacy", {}).items()})
            state.rows.extend(rows)
            audit.append("round_evaluated", round=server_round, sites=sorted(inner.last_eval))
            summary["holdout"] = role_summary(rows, "holdout")
            summary["train"] = role_summary(rows, "train")
            if last:
                state.km = {
                    site: {k: v for k, v in m.items() if k.startswith("km-") or k == "logrank-p"}
                    for site, m in inner.last_eval.items()
                    if roles.get(site) == "holdout" and "km-grid" in m
                }
        summary["seconds"] = time.perf_counter() - started
        state.rounds.append(summary)
        save(server_round)
        _progress(summary, rounds)

    status, message = "completed", ""
    if mode == "secagg":
        arrays = _run_secagg_rounds(
            grid, context, cfg, arrays, start, train_sites, config_record(cfg, **base), finish_round
        )
        start = rounds
    for server_round in range(start + 1, rounds + 1):
        started = time.perf_counter()
        global_sha = _sha(arrays)
        try:
            messages = list(
                strategy.configure_train(
                    server_round, numpy_to_arrays(arrays), config_record(cfg, **base), grid
                )
            )
            audit.append(
                "train_sent",
                round=server_round,
                model_sha256=global_sha,
                sites=sorted(inner.train_nodes[m.metadata.dst_node_id] for m in messages),
            )
            replies = list(grid.send_and_receive(messages, timeout=float(cfg.round_timeout)))
            if noise_rng is None:
                new_arrays, _ = strategy.aggregate_train(server_round, replies)
            else:
                with noise_rng.active():  # the DP noise comes from its own checkpointed stream
                    new_arrays, _ = strategy.aggregate_train(server_round, replies)
        except TooFewSitesError as error:
            status, message = "stopped", str(error)
            _audit_round(audit, inner, server_round)
            audit.append("run_stopped", round=server_round, reason=message)
            log.error(
                "run stopped in round %d: %s. Resume with `fedprog simulate resume=%s` when enough sites "
                "are back.",
                server_round,
                message,
                out,
            )
            break
        report = _audit_round(audit, inner, server_round)
        state.rejections.extend(
            {"round": server_round, "site": r.site, "reason": r.reason}
            for r in (report.rejected if report else [])
        )
        summary: dict[str, Any] = {
            "round": server_round,
            "accepted": report.accepted if report else [],
            "rejected": [r.site for r in report.rejected] if report else [],
        }
        if new_arrays is None:
            if mode not in DP_MODES:
                raise FederationError(f"round {server_round}: aggregation returned no model")
            log.error(
                "round %d: the privacy wrapper skipped the aggregate (see above); the global model is kept",
                server_round,
            )
            summary["skipped"] = True
        else:
            arrays = arrays_to_numpy(new_arrays)
        audit.append(
            "round_aggregated",
            round=server_round,
            model_sha256=_sha(arrays),
            accepted=report.accepted if report else [],
        )
        if report and report.train_metrics:
            summary["train_loss"] = _weighted_train_loss(report.train_metrics.values())
        finish_round(server_round, arrays, summary, started)
    results = write_outputs(
        out,
        cfg,
        state=state,
        sites=[s.to_dict() for s in sites],
        final_arrays=arrays,
        status=status,
        message=message,
        prep=prep.state_dict(),
    )
    audit.append("run_finished", status=status, model_sha256=_sha(arrays))
    if status != "completed":
        raise TooFewSitesError(message + f" (checkpoint kept in {out / CHECKPOINT_DIR}; resume={out})")
    return results


#: Privacy modes whose spent (epsilon, delta) is reported every round and checkpointed.
DP_MODES = ("central_dp", "local_dp")


def _privacy_mode(cfg: DictConfig) -> str:
    return str((cfg.get("privacy") or {}).get("mode", "none"))


def _weighted_train_loss(metrics: Any) -> float:
    """Example-weighted mean of the sites' ``train-loss`` (NaN when none is finite)."""
    pairs = [(m.get("train-loss", math.nan), m.get("num-examples", 0)) for m in metrics]
    pairs = [(v, n) for v, n in pairs if math.isfinite(v) and n > 0]
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs) if pairs else math.nan


def _with_privacy(strategy: Any, cfg: DictConfig, n_train: int) -> Any:
    mode = _privacy_mode(cfg)
    if mode in ("none", "secagg"):  # secagg: the legacy workflow of _run_secagg_rounds aggregates
        return strategy
    from fedprog.federated.privacy import wrap_strategy

    return wrap_strategy(strategy, cfg.privacy, n_train)


#: Strategies whose aggregate SecAgg+ can compute: the example-weighted mean of the site models.
SECAGG_STRATEGIES = ("fedavg", "fedprox")


def _run_secagg_rounds(
    grid: Grid,
    context: Context | None,
    cfg: DictConfig,
    arrays: dict[str, np.ndarray],
    start: int,
    train_sites: Sequence[SiteInfo],
    train_config: ConfigRecord,
    finish_round: Callable[[int, dict[str, np.ndarray], dict[str, Any], float], None],
) -> dict[str, np.ndarray]:
    """Rounds ``start + 1 .. cfg.rounds`` with SecAgg+ (``privacy.run_secagg``): training sites only.

    The server sees only the masked sum, so per-site update screening (NaN, ``max_update_norm``) cannot run;
    evaluation, privacy bookkeeping and checkpoints happen in ``finish_round`` after every round, as on the
    Message-API path. Held-out sites never receive a training message (only their node ids are left out
    of ``fit_client``) and still evaluate every ``eval_every`` rounds.
    """
    from fedprog.federated.privacy import run_secagg

    name = str(cfg.strategy.name)
    if name not in SECAGG_STRATEGIES:
        raise FederationError(
            f"privacy.mode=secagg gives the server only the weighted mean of the site models: use strategy "
            f"{' or '.join(SECAGG_STRATEGIES)}, not {name!r}"
        )
    if str(cfg.weighting) != "examples":
        raise FederationError(
            f"privacy.mode=secagg weights sites by num-examples, not weighting={cfg.weighting}"
        )
    rounds = int(cfg.rounds)
    if start >= rounds:
        return arrays
    config = dict(train_config)
    if name == "fedprox":
        config["proximal-mu"] = float(cfg.strategy.proximal_mu)
    started = [time.perf_counter()]

    def evaluate_fn(server_round: int, new_arrays: ArrayRecord) -> MetricRecord | None:
        if server_round <= start:  # the legacy workflow's evaluation of the initial model
            return None
        summary = {"round": server_round, "accepted": [s.site for s in train_sites], "rejected": []}
        finish_round(server_round, arrays_to_numpy(new_arrays), summary, started[0])
        started[0] = time.perf_counter()
        return None

    if context is None:
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    final = run_secagg(
        grid,
        context,
        cfg.privacy,
        numpy_to_arrays(arrays),
        rounds - start,
        [s.node_id for s in train_sites],
        train_config=config,
        evaluate_fn=evaluate_fn,
        start_round=start,
    )
    return arrays_to_numpy(final)


def _audit_round(audit: Any, inner: HeldoutAwareMixin, server_round: int) -> Any:
    report = inner.last_round
    if report is None:
        return None
    for site in report.accepted:
        audit.append(
            "update_accepted",
            round=server_round,
            site=site,
            bytes=report.update_bytes.get(site),
            l2_norm=report.update_norms.get(site),
        )
    for rejection in report.rejected:
        audit.append(
            "update_rejected",
            round=server_round,
            site=rejection.site,
            node_id=rejection.node_id,
            reason=rejection.reason,
            l2_norm=report.update_norms.get(rejection.site),
        )
    return report


def _progress(summary: Mapping[str, Any], rounds: int) -> None:
    held = summary.get("holdout", {}).get("c_index", math.nan)
    train = summary.get("train", {}).get("c_index", math.nan)
    log.info(
        "round %d/%d: %d update(s)%s, train loss %.4f, C-index held-out %.3f / training sites %.3f (%.1f s)",
        summary["round"],
        rounds,
        len(summary["accepted"]),
        f", rejected {summary['rejected']}" if summary["rejected"] else "",
        summary.get("train_loss", math.nan),
        held,
        train,
        summary["seconds"],
    )


#: The ServerApp named in pyproject.toml (``fedprog.federated.server_app:app``).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: resolve the config from the run config and run the federation."""
    cfg = config_from_run_config(context.run_config)
    run_federation(grid, cfg, context)
