"""``fedprog simulate``: run the ServerApp/ClientApp pair in Flower's simulation engine and write the outputs.

``main(cfg)`` prepares the data (the generated default dataset creates itself), writes the resolved config to
``<out>/config.yaml`` and runs Flower 1.42's in-process simulation runtime with that file as the ServerApp's
run config (``config-file``): the same apps that ``flwr run .`` starts. ``strategy=local|pooled`` runs the
baselines of :mod:`fedprog.baselines` instead (no Flower). Both write their outputs through
:mod:`fedprog.federated.outputs`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedprog.config import to_container
from fedprog.device import client_resources, simulation_device
from fedprog.federated.checkpoint import CheckpointError, check_fresh_out, resume_config
from fedprog.federated.errors import SettingsError
from fedprog.federated.outputs import fmt_value
from fedprog.federated.settings import check_model_settings, check_run_settings
from fedprog.federated.strategy import BASELINES, FederationError
from fedprog.report import save_run_config
from fedprog.results import run_folder, save_versions

log = logging.getLogger(__name__)

FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
RAY_AUTO = "auto"  # simulation.ray_address: Ray finds the running cluster (RAY_ADDRESS or the local head)
MAX_PORT = 65535


def prepare(cfg: DictConfig) -> DictConfig:
    """Resolve the config with absolute paths, generate the default dataset when missing, count the sites.

    ``out`` is validated first (a writable folder without another run's checkpoints). With ``resume``, the
    checkpoint's config is taken with the harmless overrides applied (others are refused, one line) and the
    run continues in the folder it resumes from, or in a new ``out=`` (:func:`checkpoint.resume_config`).
    """
    from fedprog.config import load_config
    from fedprog.data import DatasetLayout, build_sites

    ray_init_args(cfg.simulation)  # a wrong ray_address fails here, before data generation and Ray
    check_run_settings(cfg)
    if cfg.get("resume"):
        resumed, _ = resume_config(cfg, load_config("simulate"))
        return _with_audit_path(resumed)
    if cfg.get("out") is not None:
        check_fresh_out(str(cfg.out))
    cfg = OmegaConf.create(to_container(cfg))
    cfg.data.root = str(Path(str(cfg.data.root)).resolve())
    if cfg.data.get("synth") is not None and cfg.data.get("generate_if_missing", False):
        from fedprog.data.synth import ensure_generated

        ensure_generated(cfg.data)
    if cfg.get("audit") and cfg.audit.get("path"):
        cfg.audit.path = str(Path(str(cfg.audit.path)).resolve())
    layout = DatasetLayout.load(cfg.data)
    check_model_settings(cfg.model, layout.strong_kind or "none")  # against the data's strong modality
    heldout = cfg.get("heldout")
    sites = build_sites(layout, cfg.federation, None if heldout is None else list(heldout))
    cfg.expected_sites = len(sites)
    sim = cfg.simulation
    cfg.training.device, sim.num_gpus = simulation_device(cfg.training.device, sim.num_gpus)
    cfg.out = str(run_folder("simulate", cfg.out))  # out=null: a new runs/simulate/<time stamp>/ folder
    save_versions(Path(cfg.out))
    return _with_audit_path(cfg)


def check_site_sizes(cfg: DictConfig) -> None:
    """Refuse simulated sites below their own disclosure minimums before Ray starts (one line).

    The sites of ``fedprog simulate`` read their limits from configs/disclosure.yaml and their federation
    file; each would refuse its aggregates later (``min_cases`` cases for fitting, training and evaluation,
    ``min_events`` events for a training site's fit histogram and a held-out site's KM curves) and the run
    would fail in round 0.
    """
    from fedprog.data import DatasetLayout, SiteError, build_sites, load_cohorts
    from fedprog.data.cohort import CENSOR
    from fedprog.federated.disclosure import DisclosurePolicy

    layout = DatasetLayout.load(cfg.data)
    heldout = cfg.get("heldout")
    sites = build_sites(layout, cfg.federation, None if heldout is None else list(heldout))
    policy = DisclosurePolicy.load({}, str(cfg.federation.get("name") or "") or None)
    cohorts = load_cohorts(layout, list(dict.fromkeys(s.cohort for s in sites)))
    small = []
    for site in sites:
        censored = cohorts[site.cohort].labels[CENSOR]
        # (cases, whether their events count): evaluation (events: a held-out site's KM curves), training
        checked = [(site.test_ids or site.all_ids, site.role != "train")]
        if site.role == "train":
            checked.append((site.case_ids, True))  # the fit's event-time histogram
        for ids, with_events in checked:
            events = int((censored.loc[list(ids)] == 0).sum())
            if len(ids) < policy.min_cases or (with_events and events < policy.min_events):
                small.append(f"{site.name} ({len(ids)} cases, {events} events)")
                break
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        fix = (
            f"lower federation.val_fraction={cfg.federation.val_fraction} (each training site's validation "
            "split and the rest must both clear them)"
            if cfg.federation.get("val_fraction")
            else "use federation=per_cohort (one hospital per cohort) or a partition that merges small sites "
            "(federation=tcga_tss with federation.min_cases=N, federation.min_events=N)"
        )
        raise SiteError(
            f"federation={cfg.federation.get('name')}: {len(small)} of {len(sites)} site(s) hold fewer "
            f"than the sites' disclosure minimums (min_cases={policy.min_cases}, "
            f"min_events={policy.min_events}): "
            f"{shown}; {fix}"
        )


def _with_audit_path(cfg: DictConfig) -> DictConfig:
    """Set ``audit.path`` to ``<out>/audit.jsonl`` when the audit log is on and no path is given."""
    if cfg.get("audit") and cfg.audit.get("enabled") and not cfg.audit.get("path"):
        cfg.audit.path = str(Path(str(cfg.out)) / "audit.jsonl")
    return cfg


class RayAddressError(ValueError):
    """``simulation.ray_address`` (or a key that contradicts it) is invalid; the message names the key."""


def check_ray_address(value: Any) -> str | None:
    """The validated ``simulation.ray_address``: None (own local Ray), ``auto`` or ``host:port``."""
    if value is None:
        return None
    text = str(value).strip()
    if text == RAY_AUTO:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= MAX_PORT:
        raise RayAddressError(
            f"simulation.ray_address={value!r}: expected null (own local Ray), {RAY_AUTO!r} or host:port "
            "of a cluster started with `ray start --head`"
        )
    return text


def ray_init_args(sim: Mapping[str, Any]) -> dict[str, Any]:
    """``ray.init`` arguments of Flower's Ray backend: an own local Ray, or the cluster at ``ray_address``.

    An attached run takes the cluster's resources as ``ray start`` declared them, so ``ray_num_cpus`` (a cap
    on the local Ray only) is refused with it.
    """
    address = check_ray_address(sim.get("ray_address"))
    args: dict[str, Any] = {"logging_level": "warning", "log_to_driver": True}
    if address is not None:
        if sim.get("ray_num_cpus"):
            raise RayAddressError(
                f"simulation.ray_num_cpus={sim.get('ray_num_cpus')} caps a local Ray only; with "
                f"simulation.ray_address={address} set the cluster's CPUs with `ray start --num-cpus`"
            )
        args["address"] = address
    elif sim.get("ray_num_cpus"):
        args["num_cpus"] = int(sim["ray_num_cpus"])
    return args


def run_simulation(cfg: DictConfig) -> dict[str, Any]:
    """Run the federation of ``cfg`` (already :func:`prepare`-d) in Flower's simulation runtime.

    Flower 1.42's public ``run_simulation`` passes no run config, so this calls its ``_run_simulation`` with a
    ServerApp context whose run config holds ``config-file``; clients get everything through messages.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedprog.federated.client_app import app as client_app
    from fedprog.federated.server_app import app as server_app

    for key, value in FLWR_ENV.items():
        os.environ.setdefault(key, value)
    sim = cfg.simulation
    init_args = ray_init_args(sim)
    # own local Ray (no ray_address): Ray would wait forever for a RAY_ADDRESS cluster instead of starting one
    if "address" not in init_args and os.environ.pop("RAY_ADDRESS", None):
        log.warning("RAY_ADDRESS is set: ignored, `fedprog simulate` starts its own local Ray instance")
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    config_file = save_run_config(cfg, out)
    backend_config = {
        "client_resources": client_resources(sim.num_cpus, sim.num_gpus),
        "init_args": init_args,
    }
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={"config-file": str(config_file)}
    )
    _run_simulation(
        num_supernodes=int(cfg.expected_sites),
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend_config,
        server_app_context=context,
    )
    import json

    return json.loads((out / "results.json").read_text())


def main(cfg: DictConfig) -> int:
    """``fedprog simulate``: federated run (or ``strategy=local|pooled`` baseline); prints a short summary.

    ``rotation=loco`` runs one federation per held-out cancer and seed instead
    (:mod:`fedprog.federated.rotation`).
    """
    if str(cfg.get("rotation", {}).get("mode", "none")) != "none":
        from fedprog.federated.rotation import main as rotation_main

        return rotation_main(cfg)
    prepared = start(cfg)
    if prepared is None:
        return 2
    results = execute(prepared)
    if results is None:
        return 1
    head = results.get("headline", {})
    print(
        f"fedprog simulate [{results.get('strategy')}] {results.get('status')}: held-out C-index "
        f"(event-weighted over {head.get('heldout_sites_evaluated')} of {head.get('heldout_sites')} held-out "
        f"site(s)) {fmt_value(head.get('heldout_c_index'))}, training sites "
        f"{fmt_value(head.get('train_c_index'))} -> {results.get('out')}"
    )
    return 0 if results.get("status") == "completed" else 1


def start(cfg: DictConfig) -> DictConfig | None:
    """:func:`prepare` and :func:`check_site_sizes`; a user or data error prints one line and gives None."""
    from fedprog.data import CohortError

    try:
        prepared = prepare(cfg)
        check_site_sizes(prepared)
    except (CheckpointError, CohortError, RayAddressError, SettingsError, OSError) as error:  # one line
        print(f"fedprog simulate: error: {' | '.join(str(error).splitlines())}", file=sys.stderr)
        return None
    return prepared


def execute(cfg: DictConfig) -> dict[str, Any] | None:
    """Run a :func:`start`-ed config (federation or baseline); its results, or None after a federation
    error (one line naming the status and the run folder)."""
    if str(cfg.strategy.name) in BASELINES:
        from fedprog.baselines import run_baseline

        return run_baseline(cfg)
    try:
        return run_simulation(cfg)
    except FederationError as error:
        print(f"fedprog simulate: {_status(cfg)}: {error} -> {cfg.out}", file=sys.stderr)
        return None


def _status(cfg: DictConfig) -> str:
    """The status results.json records for a run that raised (``failed`` when unreadable)."""
    import json

    try:
        return str(json.loads((Path(str(cfg.out)) / "results.json").read_text())["status"])
    except (OSError, ValueError, KeyError):
        return "failed"
