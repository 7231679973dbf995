"""The federation's rounds: Flower's ``Strategy.start`` drives :class:`FederationRounds`.

:class:`FederationRounds` is a Flower strategy around the held-out-aware one (itself inside a DP wrapper
when ``privacy.mode`` asks); each of Flower's calls goes through to it with fedprog's bookkeeping around:

* ``configure_train``: the true round number (a resumed run goes on at ``start_round + 1``, so sites and
  checkpoints see the same rounds as in an uninterrupted run), the run's train config, the style pools
  (:class:`~fedprog.federated.style_sharing.StyleExchange`), the audited ``train_sent``;
* ``aggregate_train``: style screening, the DP noise from its own checkpointed stream, the audited
  accepted/rejected updates and ``round_aggregated``, the kept rejections, the privacy spent;
* ``configure_evaluate`` / ``aggregate_evaluate``: every ``eval_every`` rounds and at the last (which also
  asks held-out sites for KM curves) every site evaluates; rows, role summaries, the held-out check;
* ``evaluate_fn`` (Flower's after-round hook): the round's record, its checkpoint and the progress line.

SecAgg+ rounds (Flower's legacy workflow, :func:`fedprog.federated.privacy.run_secagg_rounds`) end in the
same evaluation and round record. Each round's ``timing`` (seconds: ``configure``, ``train_wait``,
``aggregate``, ``client_train``, ``evaluate``) is read by the scale benchmark. Flower's INFO lines from
``Strategy.start`` (round banners, the final result dump) show only with DEBUG logs: fedprog logs one line
per round.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from fedprog.config import to_container
from fedprog.federated.checkpoint import CHECKPOINT_DIR, Checkpoint, capture_rng, save_checkpoint
from fedprog.federated.errors import SettingsError
from fedprog.federated.fitting import Described, SiteFailure
from fedprog.federated.messages import KM_GRID_KEY, PREP_KEY, config_record
from fedprog.federated.outputs import role_summary
from fedprog.federated.run_record import RunRecord, model_sha
from fedprog.federated.settings import check_run_settings
from fedprog.federated.strategy import (
    FederationError,
    HeldoutAwareMixin,
    RoundReport,
    RunFailed,
    arrays_to_numpy,
    build_strategy,
    event_weighted_summary,
    numpy_to_arrays,
)
from fedprog.federated.style_sharing import StyleExchange

log = logging.getLogger(__name__)

#: Privacy modes whose spent (epsilon, delta) is reported every round and checkpointed.
DP_MODES = ("central_dp", "local_dp")


def privacy_mode(cfg: DictConfig) -> str:
    """``privacy.mode`` (``none`` when the group is absent)."""
    return str((cfg.get("privacy") or {}).get("mode", "none"))


class FederationRounds(Strategy):
    """Flower strategy running a federation's rounds ``start_round + 1 .. rounds`` (module doc)."""

    def __init__(
        self, run: RunRecord, heldout: HeldoutAwareMixin, styles: StyleExchange, start_round: int
    ) -> None:
        self.run, self.heldout, self.styles = run, heldout, styles
        self.cfg = run.cfg
        self.start_round, self.rounds = start_round, int(run.cfg.rounds)
        self.mode = privacy_mode(run.cfg)
        self.strategy: Any = heldout  # the DP modes wrap it (build_rounds)
        self.noise_rng: Any = None  # the DP noise's own RNG stream (DP modes)
        self.round_record: dict[str, Any] = {}  # the current round's record
        self.clock: dict[str, float] = {}  # perf_counter() marks of the current round

    # ------------------------------------------------------------------------------- Flower's hooks
    def summary(self) -> None:
        """Nothing: fedprog logs its own start-up and one line per round."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's train messages (training nodes only) with the style pools; Flower's empty
        ``config`` gives way to the run's (the fitted preprocessing, training settings)."""
        server_round += self.start_round
        self.clock = {"started": time.perf_counter()}
        outgoing = self.strategy.configure_train(server_round, arrays, self.base_config(), grid)
        outgoing = self.styles.attach(list(outgoing), self.heldout.train_nodes)
        assert self.run.arrays is not None
        self.run.audit.append(
            "train_sent",
            round=server_round,
            model_sha256=model_sha(self.run.arrays),
            sites=sorted(self.heldout.train_nodes[m.metadata.dst_node_id] for m in outgoing),
        )
        self.clock["sent"] = time.perf_counter()
        return outgoing

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the style records, aggregate (DP noise from its own stream), audit and record the round."""
        server_round += self.start_round
        self.clock["received"] = time.perf_counter()
        try:
            usable = self.styles.screen(list(replies), self.heldout)  # a bad style record rejects the update
            with self.noise_stream():
                new_arrays, metrics = self.strategy.aggregate_train(server_round, usable)
        finally:
            report = self.record_updates(server_round)
        self.round_record = self.train_summary(server_round, report)
        if new_arrays is None:
            if self.mode not in DP_MODES:
                raise FederationError(f"round {server_round}: aggregation returned no model")
            log.error(
                "round %d: the privacy wrapper skipped the aggregate; the global model is kept", server_round
            )
            self.round_record["skipped"] = True
        else:
            self.run.arrays = arrays_to_numpy(new_arrays)
        self.after_aggregate(server_round)
        return new_arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages to every site on evaluation rounds (none otherwise), with the run's config."""
        return self.evaluation_messages(server_round + self.start_round, arrays, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The sites' metrics into rows and role summaries; a held-out site that could not evaluate fails."""
        return self.record_evaluation(server_round + self.start_round, replies)

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's after-round hook: record the round, write its checkpoint (round 0: nothing to do)."""
        if server_round > 0:
            self.finish_round(server_round + self.start_round)
        return None

    # -------------------------------------------------------------------------------------- the run
    def run_rounds(self, grid: Grid, context: Context | None) -> None:
        """Rounds ``start_round + 1 .. rounds``: Flower's ``Strategy.start`` or, with SecAgg+, its legacy
        workflow (``context``: the ServerApp's, where that workflow keeps its state)."""
        assert self.run.arrays is not None
        arrays = numpy_to_arrays(self.run.arrays)
        if self.mode == "secagg":
            from fedprog.federated.privacy import run_secagg_rounds

            self.clock = {"started": time.perf_counter()}
            nodes = [s.node_id for s in self.run.train_sites]
            after_round = functools.partial(self.secagg_round, grid)
            final = run_secagg_rounds(
                grid, context, self.cfg, arrays, self.start_round, nodes, self.base_config(), after_round
            )
            self.run.arrays = arrays_to_numpy(final)
        elif self.start_round < self.rounds:
            with quiet_strategy_start():
                self.start(
                    grid,
                    arrays,
                    num_rounds=self.rounds - self.start_round,
                    timeout=float(self.cfg.round_timeout),
                    evaluate_fn=self.evaluate_fn,
                )

    def secagg_round(self, grid: Grid, server_round: int, arrays: ArrayRecord) -> None:
        """After SecAgg+ round ``server_round``: the same evaluation and round record as the hooks above."""
        self.run.arrays = arrays_to_numpy(arrays)
        accepted = [s.site for s in self.run.train_sites]
        self.round_record = {"round": server_round, "accepted": accepted, "rejected": []}
        if self.evaluates(server_round):
            messages = self.evaluation_messages(server_round, arrays, grid)
            replies = grid.send_and_receive(messages, timeout=float(self.cfg.round_timeout))
            self.record_evaluation(server_round, replies)
        self.finish_round(server_round)
        self.clock = {"started": time.perf_counter()}

    # ---------------------------------------------------------------------------------- the pieces
    def base_config(self, **extra: Any) -> ConfigRecord:
        """The config every train and evaluate message carries (the fitted preprocessing included)."""
        assert self.run.prep is not None
        return config_record(self.cfg, **{PREP_KEY: json.dumps(self.run.prep.state_dict())}, **extra)

    @contextlib.contextmanager
    def noise_stream(self) -> Iterator[None]:
        """DP modes: the aggregate's noise comes from its own checkpointed RNG stream."""
        if self.noise_rng is None:
            yield
            return
        with self.noise_rng.active():
            yield

    def record_updates(self, server_round: int) -> RoundReport | None:
        """Audit the round's accepted and rejected updates and keep the rejections (with reasons)."""
        report = self.heldout.last_round
        if report is None:
            return None
        for site in report.accepted:
            self.run.audit.append(
                "update_accepted",
                round=server_round,
                site=site,
                bytes=report.update_bytes.get(site),
                l2_norm=report.update_norms.get(site),
            )
        for rejection in report.rejected:
            self.run.audit.append(
                "update_rejected",
                round=server_round,
                site=rejection.site,
                node_id=rejection.node_id,
                reason=rejection.reason,
                l2_norm=report.update_norms.get(rejection.site),
            )
        if report.server_round == server_round:
            self.run.state.rejections.extend(
                {"round": server_round, "site": r.site, "reason": r.reason} for r in report.rejected
            )
        return report

    def train_summary(self, server_round: int, report: RoundReport | None) -> dict[str, Any]:
        """The round's record so far: accepted and rejected sites, and where the time went."""
        clock = self.clock
        return {
            "round": server_round,
            "accepted": report.accepted if report else [],
            "rejected": [r.site for r in report.rejected] if report else [],
            "timing": {  # seconds: where the round's time went (the scale benchmark reads it)
                "configure": clock["sent"] - clock["started"],
                "train_wait": clock["received"] - clock["sent"],  # send, client work, replies
                "aggregate": time.perf_counter() - clock["received"],  # screening and the aggregate
                "client_train": sum(  # engine.train time the sites reported, summed
                    float(m.get("seconds", 0.0)) for m in (report.train_metrics.values() if report else [])
                ),
            },
        }

    def after_aggregate(self, server_round: int) -> None:
        """Pool the accepted sites' styles, audit the new model, add the train loss and the privacy spent."""
        summary = self.round_record
        self.styles.pool(server_round, summary["accepted"], self.run.audit)
        assert self.run.arrays is not None
        self.run.audit.append(
            "round_aggregated",
            round=server_round,
            model_sha256=model_sha(self.run.arrays),
            accepted=summary["accepted"],
        )
        report = self.heldout.last_round
        if report and report.train_metrics:
            summary["train_loss"] = event_weighted_summary(report.train_metrics.values()).get(
                "train-loss", math.nan
            )  # example-weighted
        if getattr(self.heldout, "last_info", None):
            summary["server_step"] = dict(self.heldout.last_info)  # FedNewton: objective, step norm
        if self.mode in DP_MODES:
            from fedprog.federated.privacy import privacy_spent

            spent = privacy_spent(self.strategy)
            summary["privacy"] = {"epsilon": spent["epsilon"], "delta": spent["delta"]}

    def evaluates(self, server_round: int) -> bool:
        """Whether every site evaluates the global model after ``server_round``."""
        return server_round % int(self.cfg.eval_every) == 0 or server_round == self.rounds

    def evaluation_messages(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> list[Message]:
        """Evaluate messages to every site on evaluation rounds; the last also carries the KM grid."""
        if not self.evaluates(server_round):
            return []
        self.clock["evaluating"] = time.perf_counter()
        extra = {}
        if server_round == self.rounds:
            report = self.cfg.report
            extra[KM_GRID_KEY] = np.linspace(
                0.0, float(report.km_grid_max), int(report.km_grid_points)
            ).tolist()
        return list(self.strategy.configure_evaluate(server_round, arrays, self.base_config(**extra), grid))

    def record_evaluation(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Rows and role summaries of the sites' metrics (KM curves on the last round), then the check."""
        if not self.evaluates(server_round):
            return None
        metrics = self.strategy.aggregate_evaluate(server_round, list(replies))
        per_site, summary = self.heldout.last_eval, self.round_record
        roles = {s.site: s.role for s in self.run.sites}
        rows = _eval_rows(server_round, per_site, roles)
        for row in rows:
            row.update(summary.get("privacy", {}))
        state = self.run.state
        state.rows.extend(rows)
        self.run.audit.append("round_evaluated", round=server_round, sites=sorted(per_site))
        summary["holdout"] = role_summary(rows, "holdout")
        summary["train"] = role_summary(rows, "train")
        if server_round == self.rounds:
            state.km = {
                site: {k: v for k, v in m.items() if k.startswith("km-") or k == "logrank-p"}
                for site, m in per_site.items()
                if roles.get(site) == "holdout" and KM_GRID_KEY in m
            }
        self.check_evaluated(server_round, roles)
        summary.setdefault("timing", {})["evaluate"] = time.perf_counter() - self.clock["evaluating"]
        return metrics

    def check_evaluated(self, server_round: int, roles: Mapping[str, str]) -> None:
        """Record every site that sent no usable evaluation; fail on a held-out one unless allow_partial."""
        answered = set(self.heldout.last_eval)
        failed = dict(self.heldout.eval_failures)
        failed.update(
            {site: "no evaluation reply" for site in roles if site not in answered and site not in failed}
        )
        for site, reason in sorted(failed.items()):
            self.run.state.failures.append(SiteFailure(site, "evaluate", reason, server_round).to_dict())
            self.run.audit.append(
                "site_failed", stage="evaluate", round=server_round, site=site, reason=reason
            )
        held = sorted(site for site in failed if roles.get(site) == "holdout")
        if held and not self.cfg.allow_partial:
            names = ", ".join(f"{s} ({failed[s]})" for s in held)
            raise RunFailed(
                f"round {server_round}: held-out site(s) {names} could not be evaluated; the headline would "
                "not cover them (set allow_partial=true to report the others)"
            )

    def finish_round(self, server_round: int) -> None:
        """Keep the round's record, write its checkpoint and log its progress line."""
        summary = self.round_record
        summary["seconds"] = time.perf_counter() - self.clock["started"]
        self.run.state.rounds.append(summary)
        self.save(server_round)
        _progress(summary, self.rounds)

    def save(self, server_round: int) -> None:
        """Write the checkpoint of ``server_round`` (weights, strategy, RNG, config, run id, state)."""
        run = self.run
        assert run.prep is not None and run.arrays is not None
        federation = {
            "prep": run.prep.state_dict(),
            "sites": [s.to_dict() for s in run.sites],
            "state": run.state.__dict__,
            "style": self.styles.state_dict(),
        }
        if self.mode in DP_MODES:
            from fedprog.federated.privacy import privacy_state

            federation["privacy"] = {**privacy_state(self.strategy), "noise_rng": self.noise_rng.state_dict()}
        checkpoint = Checkpoint(
            server_round=server_round,
            arrays=run.arrays,
            strategy_state=self.heldout.state_dict(),
            rng=capture_rng(),
            config=to_container(self.cfg),
            federation=federation,
            run_id=str(self.cfg.run_id),
        )
        save_checkpoint(run.out / CHECKPOINT_DIR, checkpoint, keep=int(self.cfg.checkpoint.keep))


def build_rounds(run: RunRecord, described: Described, checkpoint: Checkpoint | None) -> FederationRounds:
    """The rounds of ``run``: the held-out-aware strategy (DP-wrapped when asked), restored on a resume."""
    cfg = run.cfg
    try:
        check_run_settings(cfg)  # checked before start-up too; a run config made elsewhere is checked here
    except SettingsError as error:
        raise RunFailed(str(error)) from None
    heldout = build_strategy(
        OmegaConf.to_container(cfg.strategy, resolve=True),
        weighting=str(cfg.weighting),
        min_train_sites=int(cfg.min_train_sites),
        max_update_norm=cfg.max_update_norm,
        weight_decay=float(cfg.training.weight_decay),
    )
    train = {s.node_id: s.site for s in run.train_sites}
    heldout.set_sites(train, {s.node_id: s.site for s in run.sites}, described.declared)
    styles = StyleExchange(cfg, described.declared[run.train_sites[0].site].strong_dim)  # style_sharing.py
    saved = checkpoint.federation if checkpoint is not None else {}
    if checkpoint is not None:
        heldout.load_state_dict(checkpoint.strategy_state)
        styles.load_state_dict(saved.get("style", {}))
    rounds = FederationRounds(run, heldout, styles, checkpoint.server_round if checkpoint is not None else 0)
    if rounds.mode in DP_MODES:
        from fedprog.federated.privacy import NoiseRng, load_privacy_state, wrap_strategy

        rounds.strategy = wrap_strategy(heldout, cfg.privacy, len(train))
        if checkpoint is not None:
            load_privacy_state(rounds.strategy, saved.get("privacy", {}))
        rounds.noise_rng = NoiseRng(saved.get("privacy", {}).get("noise_rng"))
    return rounds


class _StartBanners(logging.Filter):
    """Leaves out Flower's INFO lines of ``Strategy.start`` (round banners, result dump) unless DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for an INFO record of ``Strategy.start`` or its start-up helper (unless DEBUG logs)."""
        from_start = record.funcName in ("start", "log_strategy_start_info") and "strategy" in record.pathname
        return (
            not from_start or record.levelno > logging.INFO or logging.getLogger().isEnabledFor(logging.DEBUG)
        )


@contextlib.contextmanager
def quiet_strategy_start() -> Iterator[None]:
    """Flower's ``Strategy.start`` without its INFO chatter on the ``flwr`` logger (module doc)."""
    flwr_logger, quiet = logging.getLogger("flwr"), _StartBanners()
    flwr_logger.addFilter(quiet)
    try:
        yield
    finally:
        flwr_logger.removeFilter(quiet)


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
                "missing_genes": int(m.get("missing-genes", 0)),
            }
        )
    return rows


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
