"""The fedprog Flower ServerApp: describe sites, fit preprocessing from aggregates, run rounds, checkpoint.

One ServerApp serves simulation and deployment. Its run config holds ``config-name`` (default ``simulate``),
``overrides`` (space-separated Hydra overrides) and ``config-file`` (a resolved YAML; wins when set)::

    flwr run . --run-config "overrides='rounds=3 strategy=fedprox'"

A run (:func:`run_federation`; its state in :class:`~fedprog.federated.run_record.RunRecord`): (1)
``describe`` asks every node for its site, role and counts, after each site checked its own data; (2)
``fit-stats`` asks the TRAINING sites only for aggregates, from which the survival bins and transforms are
fitted (:mod:`fedprog.federated.fitting`; a resumed run restores them from its checkpoint); (3) Flower's
``Strategy.start`` runs the rounds (:mod:`fedprog.federated.rounds`): training nodes only train, every reply
is screened, every site evaluates every ``eval_every`` rounds, and a checkpoint is written after each round;
(4) outputs go to ``out``.

No silent drops: a site that fails to connect, describe or evaluate is recorded (``results.json``'s
``failures``, report.md) with a sanitized reason; a failed describe or a held-out site that cannot be
evaluated stops the run (status ``failed``) unless ``allow_partial=true``.

Privacy (``privacy`` group): ``central_dp`` / ``local_dp`` wrap the strategy (``privacy.wrap_strategy``); the
spent (epsilon, delta) goes into every round's record, and the accountant state and the DP-noise RNG stream
into every checkpoint. ``secagg`` runs the training rounds through Flower's legacy SecAgg+ workflow
(``privacy.run_secagg_rounds``, FedAvg/FedProx only) with the same per-round evaluation and checkpoints.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedprog.config import load_config, to_container
from fedprog.federated.checkpoint import (
    CHECKPOINT_DIR,
    Checkpoint,
    CheckpointError,
    check_fresh_out,
    load_checkpoint,
    resume_config,
)
from fedprog.federated.federation import FitError
from fedprog.federated.grid import PollingGrid
from fedprog.federated.rounds import FederationRounds, build_rounds, privacy_mode
from fedprog.federated.run_record import RunRecord
from fedprog.federated.strategy import FederationError, RunFailed, TooFewSitesError
from fedprog.results import run_folder


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


def resolve_start(cfg: DictConfig) -> tuple[DictConfig, Checkpoint | None]:
    """The run's config and the checkpoint to continue from (None: a new run, with a fresh ``run_id``).

    A resume keeps the checkpoint's run id and writes to the folder it resumes from (or a new ``out=``); a
    config already prepared for this resume (same ``run_id``) is used as it is. A new run refuses an ``out``
    that holds checkpoints.
    """
    if not cfg.get("resume"):
        check_fresh_out(cfg.out)
        cfg = OmegaConf.create(to_container(cfg))
        cfg.run_id = cfg.get("run_id") or uuid.uuid4().hex[:12]
        return cfg, None
    checkpoint = load_checkpoint(cfg.resume)
    if cfg.get("run_id") is None:  # not prepared: take the checkpoint's config (deployment)
        return resume_config(cfg, None)
    if checkpoint.run_id != cfg.run_id:
        raise CheckpointError(
            f"resume={cfg.resume}: the checkpoint belongs to run {checkpoint.run_id}, not run {cfg.run_id}"
        )
    return cfg, checkpoint


def run_federation(grid: Grid, cfg: DictConfig, context: Context | None = None) -> dict[str, Any]:
    """Run the whole federation on ``grid`` and write the outputs to ``cfg.out``; returns the results dict.

    ``context`` is the ServerApp's context; only ``privacy.mode=secagg`` needs it (Flower's legacy
    workflow keeps its state there), and a fresh one is made when it is None.

    Raises
    ------
    FederationError
        The run stopped (too few sites: resumable) or failed (a site could not take part and
        ``allow_partial`` is false); results.json and report.md are written first and say why.
    """
    cfg, checkpoint = resolve_start(cfg)
    if cfg.get("reply_poll_s") is not None:
        grid = PollingGrid(grid, float(cfg.reply_poll_s), float(cfg.reply_poll_max_s))
    run = RunRecord(cfg)
    try:
        rounds = start_run(grid, run, checkpoint)
        rounds.run_rounds(grid, context)
    except TooFewSitesError as error:
        run.stop("stopped", str(error))
    except (RunFailed, FitError) as error:
        run.stop("failed", str(error))
    results = run.write()
    if run.status == "stopped":
        raise TooFewSitesError(
            run.message + f" (checkpoint kept in {run.out / CHECKPOINT_DIR}; resume={run.out})"
        )
    if run.status == "failed":
        raise RunFailed(run.message)
    return results


def start_run(grid: Grid, run: RunRecord, checkpoint: Checkpoint | None) -> FederationRounds:
    """Describe the sites, restore ``checkpoint`` or fit the preprocessing and initial model; the rounds."""
    cfg = run.cfg
    run.audit.append(
        "run_started",
        run_id=str(cfg.run_id),
        strategy=str(cfg.strategy.name),
        rounds=int(cfg.rounds),
        seed=int(cfg.seed),
        resume=str(cfg.get("resume")),
        privacy=privacy_mode(cfg),
    )
    described = run.describe(grid)
    if checkpoint is None:
        run.fit(grid, described)
    else:
        run.restore(checkpoint)
    run.prepared(described)
    rounds = build_rounds(run, described, checkpoint)
    if rounds.start_round == 0:
        rounds.save(0)  # the initial model: a run killed in round 1 resumes from here
    return rounds


#: The ServerApp named in pyproject.toml (``fedprog.federated.server_app:app``).
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: resolve the config from the run config and run the federation."""
    cfg = config_from_run_config(context.run_config)
    run_federation(grid, cfg, context)
