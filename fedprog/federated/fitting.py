"""Start of a federated run on the server: wait for nodes, ``describe`` every site, fit the preprocessing.

Every reply is untrusted: :func:`describe_federation` checks it with :func:`messages.parse_describe` and
records each node that fails (error reply, bad reply, unsafe name, no answer) as a :class:`SiteFailure` with a
sanitized one-line reason instead of dropping it. :func:`fit_preprocessing` asks the TRAINING sites only for
aggregates (event-time histogram, expression and tabular moments), checks their shapes and counts, and fits
the bins and transforms from the pooled values.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fedprog.data import CohortError, ExpressionTransform, GeneGroups, SurvivalBins, TabularTransform
from fedprog.data.harmonize import feature_genes
from fedprog.federated import messages
from fedprog.federated.federation import (
    FitError,
    SiteInfo,
    assign_roles,
    bin_edges_from_histogram,
    pool_moments,
    time_grid,
)
from fedprog.federated.messages import (
    ACTION_KEY,
    DESCRIBE,
    FIT_STATS,
    GENES_KEY,
    DescribeReply,
    ReplyError,
    config_record,
)
from fedprog.federated.strategy import FederationError
from fedprog.models import create_model
from fedprog.pipeline import Preprocessing, n_outputs_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteFailure:
    """A site (or node) that could not take part in one stage, with a sanitized one-line reason."""

    site: str
    stage: str  # connect | describe | fit | evaluate
    reason: str
    round: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (results.json, checkpoints)."""
        return asdict(self)


@dataclass
class Described:
    """What the ``describe`` query learnt: the site table, each site's checked reply, and the failures."""

    sites: list[SiteInfo]
    declared: dict[str, DescribeReply]
    failures: list[SiteFailure] = field(default_factory=list)

    @property
    def extra(self) -> dict[str, dict[str, Any]]:
        """Per site: the describe info (genes, groups, strong-kind) and ``strong-dim``."""
        return {name: {**d.info, "strong-dim": d.strong_dim} for name, d in self.declared.items()}


# ------------------------------------------------------------------------------------------------ nodes
def wait_for_nodes(grid: Grid, cfg: DictConfig) -> tuple[list[int], list[SiteFailure]]:
    """Node ids once ``expected_sites`` nodes are connected (or the count is stable), at most the timeout;
    with fewer than expected, a ``connect`` failure says how many never came."""
    expected = cfg.expected_sites
    deadline = time.monotonic() + float(cfg.node_wait_timeout)
    last, stable_since = -1, time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) != last:
            last, stable_since = len(nodes), now
        if expected is not None and len(nodes) >= int(expected):
            return nodes, []
        if expected is None and nodes and now - stable_since >= float(cfg.node_settle_s):
            return nodes, []
        if now > deadline:
            if not nodes:
                raise FederationError(f"no site connected within node_wait_timeout={cfg.node_wait_timeout} s")
            missing = int(expected) - len(nodes)
            reason = (
                f"{missing} of {expected} expected node(s) did not connect within {cfg.node_wait_timeout} s"
            )
            return nodes, [SiteFailure(f"<{missing} node(s)>", "connect", reason)]
        time.sleep(0.2)


def query(
    grid: Grid, nodes: Sequence[int], record: ConfigRecord, timeout: float
) -> tuple[dict[int, Message], dict[int, messages.SiteError]]:
    """Send one query to ``nodes``: (replies by node, decoded errors by node; a silent node is an error)."""
    outgoing = [
        Message(content=RecordDict({"config": record}), message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes
    ]
    replies, errors = {}, {}
    for reply in grid.send_and_receive(outgoing, timeout=timeout):
        node = reply.metadata.src_node_id
        error = messages.reply_error(reply)
        if error is None:
            replies[node] = reply
        else:
            errors[node] = error
            log.warning("query to node %d failed: %s", node, error)
    for node in set(nodes) - set(replies) - set(errors):
        errors[node] = messages.SiteError(None, "Timeout", f"no reply within {timeout:g} s")
    return replies, errors


# ------------------------------------------------------------------------------------------------ describe
def describe_federation(grid: Grid, nodes: Sequence[int], cfg: DictConfig) -> Described:
    """Ask each node who it is; check every reply; apply the run's ``heldout`` list to the roles."""
    record = config_record(cfg, **{ACTION_KEY: DESCRIBE})
    replies, errors = query(grid, nodes, record, float(cfg.round_timeout))
    failures = [
        SiteFailure(e.site or f"node-{node}", "describe", str(e)) for node, e in sorted(errors.items())
    ]
    infos, declared = [], {}
    for node, reply in sorted(replies.items()):
        try:
            described = messages.parse_describe(reply)
            if described.site in declared:
                raise ReplyError(f"site name {described.site!r} is claimed by two nodes")
        except ReplyError as error:
            failures.append(SiteFailure(f"node-{node}", "describe", messages.sanitize(str(error))))
            continue
        declared[described.site] = described
        infos.append(
            SiteInfo(
                node, described.site, described.role, described.cohort, described.n_cases, described.n_events
            )
        )
    for failure in failures:
        log.error("site %s failed to describe itself: %s", failure.site, failure.reason)
    heldout = None if cfg.heldout is None else list(cfg.heldout)
    if (
        heldout is not None and failures
    ):  # a held-out site that failed is reported as a failure, not as unknown
        known = {i.site for i in infos} | {i.cohort for i in infos}
        heldout = [name for name in heldout if name in known]
    return Described(assign_roles(infos, heldout), declared, failures)


def describe_sites(
    grid: Grid, nodes: Sequence[int], cfg: DictConfig
) -> tuple[list[SiteInfo], dict[str, dict]]:
    """The site table and each site's extra info; raises FederationError naming every site that failed."""
    described = describe_federation(grid, nodes, cfg)
    if described.failures:
        raise FederationError("; ".join(f"site {f.site}: {f.reason}" for f in described.failures))
    return described.sites, described.extra


# ------------------------------------------------------------------------------------------------ fitting
def fit_preprocessing(
    grid: Grid, cfg: DictConfig, train_sites: Sequence[SiteInfo], extra: Mapping[str, Mapping[str, Any]]
) -> Preprocessing:
    """Fit groups, expression/tabular transforms and bins from training-site aggregates (never held-out ones).

    Raises
    ------
    FitError
        A training site refused or sent a malformed reply (named, with its reason), or the sites disagree on
        transform settings, table columns or genes.
    """
    names = [s.site for s in train_sites]
    groups = _common_groups(names, extra)
    genes_json = json.dumps({"names": groups.names, "genes": groups.genes}) if groups is not None else ""
    record = config_record(cfg, **{ACTION_KEY: FIT_STATS, GENES_KEY: genes_json})
    replies, errors = query(grid, [s.node_id for s in train_sites], record, float(cfg.round_timeout))
    if errors:
        by_node = {s.node_id: s.site for s in train_sites}
        failed = "; ".join(f"site {by_node.get(n, n)}: {e}" for n, e in sorted(errors.items()))
        raise FitError(
            f"training site(s) sent no fitting statistics ({failed}); cannot fit the preprocessing"
        )
    edges = time_grid(float(cfg.fit.time_grid_max), float(cfg.fit.time_grid_step))
    hist = np.zeros(len(edges) - 1)
    moments, tables, infos = [], [], {}
    for site in train_sites:
        try:
            part, info = _fit_reply(replies[site.node_id], len(edges) - 1, groups, extra[site.site])
        except (ReplyError, KeyError, TypeError, ValueError) as error:
            raise FitError(
                f"site {site.site}: bad fitting statistics: {messages.sanitize(str(error))}"
            ) from error
        hist += part["event-hist"]
        infos[site.site] = info
        if groups is not None:
            moments.append({**{k: part[k] for k in ("count", "sum", "sumsq")}, "genes": info["genes"]})
        if "tabular" in info:
            tables.append(info["tabular"])
    bins = SurvivalBins(bin_edges_from_histogram(hist, edges, int(cfg.n_bins)))
    expression = _expression(groups, infos, moments)
    strong = _tabular(tables, infos, names)
    log.info(
        "preprocessing fitted from the aggregates of %d training site(s) %s: %s", len(names), names, bins
    )
    return Preprocessing(groups=groups, expression=expression, strong=strong, bins=bins)


def _fit_reply(
    reply: Message, n_buckets: int, groups: GeneGroups | None, declared: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check one ``fit-stats`` reply: histogram length and counts, expression moments' shapes."""
    metrics, info = messages.reply_metrics(reply), messages.reply_info(reply)
    hist = np.asarray(metrics["event-hist"], dtype=float)
    if hist.shape != (n_buckets,) or not np.all(np.isfinite(hist)) or np.any(hist < 0) or np.any(hist % 1):
        raise ReplyError(f"event-hist must hold {n_buckets} non-negative integer counts")
    part: dict[str, Any] = {"event-hist": hist}
    if groups is not None:
        n_genes = len(info["genes"])
        part["count"] = messages.count(metrics["expr-count"], "expr-count")
        for key in ("sum", "sumsq"):
            part[key] = np.asarray(metrics[f"expr-{key}"], dtype=float)
            if part[key].shape != (n_genes,) or not np.all(np.isfinite(part[key])):
                raise ReplyError(f"expr-{key} must hold {n_genes} finite values")
    return part, info


def _expression(
    groups: GeneGroups | None, infos: Mapping[str, Mapping[str, Any]], moments: list[dict[str, Any]]
) -> ExpressionTransform | None:
    if groups is None:
        return None
    settings = _same_settings(infos, "transform", "expression-transform")
    pooled = pool_moments(moments)
    return ExpressionTransform.from_moments(
        pooled["count"], pooled["sum"], pooled["sumsq"], genes=pooled["genes"], **settings
    )


def _tabular(
    tables: list[Any], infos: Mapping[str, Mapping[str, Any]], names: Sequence[str]
) -> TabularTransform | None:
    if not tables:
        return None
    if len(tables) != len(names):
        lacking = sorted(name for name, info in infos.items() if "tabular" not in info)
        raise FitError(f"training site(s) {lacking} sent no tabular moments while others did")
    settings = _same_settings(infos, "tabular-settings", "tabular-transform")
    try:
        return TabularTransform.from_moments(TabularTransform.merge_moments(tables), **settings)
    except CohortError as error:
        raise FitError(f"training sites {list(names)}: tabular transform: {error}") from error


#: Gene policies a federation fits from per-site sums (``union`` needs per-gene counts: train, pooled, local).
FEDERATED_GENE_POLICIES = ("intersection", "strict")


def _common_groups(names: Sequence[str], extra: Mapping[str, Mapping[str, Any]]) -> GeneGroups | None:
    """The gene groups restricted to the feature genes the training sites fix (None without expression).

    The genes follow the sites' ``gene_policy`` (:func:`fedprog.data.harmonize.feature_genes`, the one rule
    every path uses): ``intersection`` (default) or ``strict``.

    Raises
    ------
    FitError
        Sites with different policies, ``union``, a ``strict`` mismatch or no shared gene (names the sites).
    """
    first = extra[names[0]]
    if first.get("groups") is None:
        return None
    policies = {name: str(extra[name].get("gene-policy") or "intersection") for name in names}
    policy = policies[names[0]]
    if set(policies.values()) != {policy} or policy not in FEDERATED_GENE_POLICIES:
        raise FitError(
            f"training sites' gene_policy {policies}: a federation needs one of "
            f"{'|'.join(FEDERATED_GENE_POLICIES)} at every site"
        )
    try:
        ordered = feature_genes({name: list(extra[name].get("genes") or []) for name in names}, policy)
    except CohortError as error:
        raise FitError(f"training sites {list(names)}: {error}") from error
    try:
        return GeneGroups(
            list(first["groups"]["names"]), [list(g) for g in first["groups"]["genes"]]
        ).restrict(ordered)
    except CohortError as error:
        raise FitError(f"training sites {list(names)}: gene groups: {error}") from error


def _same_settings(infos: Mapping[str, Mapping[str, Any]], key: str, what: str) -> dict[str, Any]:
    """The transform settings every training site reported under ``key`` (they must agree)."""
    seen = {site: json.dumps(info.get(key), sort_keys=True) for site, info in infos.items()}
    if len(set(seen.values())) != 1:
        raise FitError(f"training sites use different {what} settings: {sorted(seen)}")
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
