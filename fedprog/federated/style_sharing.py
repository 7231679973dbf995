"""Federated style sharing (issue 10, item 2): sites send aggregate CADE style summaries; the server pools.

Protocol (only when :func:`sharing_enabled`: ``style_sharing: true``, style CADE on, ``privacy.mode=none``):

1. After local training in round r (but the last: nothing would use it), a training site adds to its train
   reply a ``fedprog-style`` ConfigRecord with, per modality CADE re-styles,
   :meth:`fedprog.models.cade.CADE.style_summary` of the bags it saw this round: the count of bag styles
   (bags seen over the round's local epochs) and the per-channel mean and variance of the bags' mu and log
   sigma (one float per channel CADE re-styles: ``model.dim``, or the WSI feature width with
   ``model.cade.position=input``; never a patient's statistics). It sends a modality's summary only when
   its training cases reach its own disclosure ``min_cases`` and the summary covers at least
   ``model.cade.summary_min_count`` bag styles (:func:`site_style_record`).
2. The server checks each record (:func:`fedprog.federated.messages.check_style_record`: shapes = the model's
   channels, finite, integer counts); a malformed one rejects that site's update with a one-line reason. The
   summaries of the sites whose updates were accepted are kept and audited (``style_bank_pooled``: round,
   sites and counts, no values) (:class:`StyleExchange`).
3. Round r + 1's train message to site s carries ``fedprog-style-bank``: the leave-one-out pool
   (:func:`fedprog.models.cade.pool_style_summaries`) of the OTHER sites' summaries, per modality, so that s
   synthesizes styles it has never seen. It is a pooled summary, not a sampled bank: the site draws
   ``max(model.cade.bank_size, 1)`` styles from it (:func:`fedprog.models.cade.sample_style_bank`, seeded by
   the run seed, round and site) and installs them with :meth:`CADE.set_external_bank` before training
   (:func:`install_style_bank`); CADE then takes a partner from it with probability ``external_prob``.

Held-out sites never train, so they never send nor receive styles. With two training sites, each one receives
the other's summary as it is (the pool of one); the sender's ``min_cases`` limit is what bounds it. SecAgg+
rounds (legacy workflow, weights only) and the DP modes (the summaries would carry no DP noise) share nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from omegaconf import DictConfig
from torch import nn

from fedprog.data import SurvivalDataset
from fedprog.federated.disclosure import DisclosurePolicy
from fedprog.federated.messages import (
    STYLE_BANK_KEY,
    STYLE_KEY,
    STYLE_MODALITIES,
    STYLE_VECTORS,
    ReplyError,
    check_style_record,
)
from fedprog.models.cade import CADE, StyleSummary, pool_style_summaries, sample_style_bank

log = logging.getLogger(__name__)

Summaries = dict[str, StyleSummary]  # modality -> summary


def sharing_enabled(cfg: DictConfig) -> bool:
    """True when styles travel: ``style_sharing``, style CADE enabled, no privacy mode (module doc)."""
    cade = cfg.model.cade
    return (
        bool(cfg.style_sharing)
        and bool(cade.enabled)
        and str(cade.variant) == "style"
        and str(cfg.privacy.mode) == "none"
    )


def summaries_to_record(summaries: Mapping[str, StyleSummary]) -> ConfigRecord:
    """``{modality: summary}`` as a ConfigRecord of ``"<modality>.<field>"`` keys (int count, float lists)."""
    values: dict[str, Any] = {}
    for modality, summary in summaries.items():
        values[f"{modality}.count"] = int(summary.count)
        for name in STYLE_VECTORS:
            values[f"{modality}.{name}"] = [float(v) for v in getattr(summary, name)]
    return ConfigRecord(values)


def styles_at_input(cfg: DictConfig) -> bool:
    """True when CADE re-styles the WSI patch features (``model.cade.position=input``)."""
    return str(cfg.model.cade.get("position", "encoded")) == "input"


def style_widths(cfg: DictConfig, strong_dim: int | None) -> dict[str, int]:
    """Channels of each modality's style: ``model.dim``; with ``model.cade.position=input`` the strong
    modality's are its input features (``strong_dim``, the WSI feature width)."""
    dim = int(cfg.model.dim)
    if not styles_at_input(cfg):
        return {"strong": dim, "weak": dim}
    if strong_dim is None:
        raise ValueError("model.cade.position=input needs the WSI feature width (strong-dim) of the sites")
    return {"strong": int(strong_dim), "weak": dim}


def record_to_summaries(record: Mapping[str, Any], widths: Mapping[str, int]) -> Summaries:
    """The checked summaries of a style record (ReplyError with a one-line reason when malformed)."""
    return {m: StyleSummary.from_arrays(v) for m, v in check_style_record(record, widths).items()}


# ---------------------------------------------------------------------------------------------- client side
def site_style_record(
    cfg: DictConfig, model: nn.Module, n_cases: int, policy: DisclosurePolicy, site: str
) -> ConfigRecord | None:
    """The style summaries this site sends after training (None: sharing off or nothing above its limits)."""
    cade = getattr(model, "cade", None)
    if not sharing_enabled(cfg) or not isinstance(cade, CADE):
        return None
    if n_cases < policy.min_cases:
        log.info("site %s: no style summary (%d case(s) < min-cases %d)", site, n_cases, policy.min_cases)
        return None
    limit = max(int(cfg.model.cade.summary_min_count), 1)
    summaries = {m: cade.style_summary(m, limit) for m in STYLE_MODALITIES}
    kept = {m: s for m, s in summaries.items() if s is not None}
    if not kept:
        log.info("site %s: no style summary (fewer than %d bag styles this round)", site, limit)
        return None
    return summaries_to_record(kept)


def install_style_bank(
    cfg: DictConfig, model: nn.Module, record: Mapping[str, Any] | None, seed: int, data: SurvivalDataset
) -> list[str]:
    """Sample and install the external CADE bank from the server's pooled summaries; the modalities set.
    ``data``: the site's training data, whose WSI feature width (read from a bag) is the strong style's
    channels with ``position=input`` (read only then)."""
    cade = getattr(model, "cade", None)
    if record is None or not sharing_enabled(cfg) or not isinstance(cade, CADE):
        return []
    strong_dim = data.strong_dim if styles_at_input(cfg) else None
    summaries = record_to_summaries(record, style_widths(cfg, strong_dim))
    generator = torch.Generator().manual_seed(int(seed))
    k = max(int(cfg.model.cade.bank_size), 1)
    installed = []
    for modality in STYLE_MODALITIES:  # fixed order: the draws depend on the seed only
        if modality in summaries and modality in cade.slots:
            mu, sigma = sample_style_bank(summaries[modality], k, generator)
            cade.set_external_bank(mu, sigma, modality)
            installed.append(modality)
    return installed


# ---------------------------------------------------------------------------------------------- server side
class StyleExchange:
    """The server's side: screen style records in train replies, keep accepted sites' summaries, attach the
    leave-one-out pools to the next round's train messages, audit each round, checkpoint its state."""

    def __init__(self, cfg: DictConfig, strong_dim: int | None = None) -> None:
        self.enabled = sharing_enabled(cfg)
        self.widths = style_widths(cfg, strong_dim) if self.enabled else {}
        self.pending: dict[str, Summaries] = {}  # this round's checked summaries, by site
        self.banks: dict[str, Summaries] = {}  # last round's summaries of accepted sites, by site

    def attach(self, outgoing: Sequence[Message], train_nodes: Mapping[int, str]) -> list[Message]:
        """The train messages, each with the pool of the other sites' summaries (when there are any)."""
        if not self.enabled or not self.banks:
            return list(outgoing)
        out = []
        for msg in outgoing:
            pooled = self.pool_for(train_nodes[msg.metadata.dst_node_id])
            if not pooled:
                out.append(msg)
                continue
            content = RecordDict({**dict(msg.content.items()), STYLE_BANK_KEY: summaries_to_record(pooled)})
            out.append(
                Message(
                    content=content,
                    dst_node_id=msg.metadata.dst_node_id,
                    message_type=msg.metadata.message_type,
                    group_id=msg.metadata.group_id,
                )
            )
        return out

    def pool_for(self, site: str) -> Summaries:
        """Per modality, the pooled summaries of every site but ``site`` (sites in name order)."""
        pooled: Summaries = {}
        for modality in STYLE_MODALITIES:
            others = [s[modality] for name, s in sorted(self.banks.items()) if name != site and modality in s]
            if others:
                pooled[modality] = pool_style_summaries(others)
        return pooled

    def screen(self, replies: Sequence[Message], inner: Any) -> list[Message]:
        """Keep the replies whose style record (if any) is valid; reject the others' updates with a reason."""
        from fedprog.federated.strategy import Rejection

        self.pending = {}
        kept = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error() or STYLE_KEY not in msg.content.config_records:
                kept.append(msg)
                continue
            site = inner.train_nodes.get(node, f"<unknown node {node}>")
            try:
                if not self.enabled:
                    raise ReplyError("style summary sent although style sharing is off")
                self.pending[site] = record_to_summaries(msg.content.config_records[STYLE_KEY], self.widths)
            except ReplyError as error:
                log.warning("update of site %s rejected: %s", site, error)
                if inner.last_round is not None:
                    inner.last_round.rejected.append(Rejection(site, node, str(error)))
                continue
            kept.append(msg)
        return kept

    def pool(self, server_round: int, accepted: Sequence[str], audit: Any) -> None:
        """Keep the accepted sites' summaries for the next round and audit them (sites and counts only)."""
        if not self.enabled:
            return
        self.banks = {site: self.pending[site] for site in sorted(accepted) if site in self.pending}
        self.pending = {}
        counts = {site: {m: s.count for m, s in summaries.items()} for site, summaries in self.banks.items()}
        audit.append("style_bank_pooled", round=server_round, sites=sorted(self.banks), counts=counts)

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state for the checkpoint: the kept summaries, by site."""
        return {site: dict(summaries_to_record(s)) for site, s in self.banks.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run sends the same banks as an uninterrupted one)."""
        self.banks = {site: record_to_summaries(record, self.widths) for site, record in state.items()}
