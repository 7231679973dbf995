"""``fedprog simulate``: run the ServerApp/ClientApp pair in Flower's simulation engine and write the outputs.

``main(cfg)`` prepares the data (the generated default dataset creates itself), writes the resolved config to
``<out>/config.yaml`` and runs Flower 1.42's in-process simulation runtime with that file as the ServerApp's
run config (``config-file``): the same apps that ``flwr run .`` starts. ``strategy=local|pooled`` runs the
baselines of :mod:`fedprog.federated.baselines` instead (no Flower). :func:`write_outputs` writes
``results.json``, ``rounds.csv``, ``report.md`` with PNG plots, the resolved config and package versions.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fedprog.config import to_container
from fedprog.device import client_resources, simulation_device
from fedprog.federated.checkpoint import CheckpointError, check_fresh_out, resume_config
from fedprog.federated.strategy import BASELINES, FederationError
from fedprog.report import (
    ReportBuilder,
    UnsafePathError,
    environment_info,
    plot_rounds,
    safe_output_path,
    save_run_config,
    write_json,
)
from fedprog.results import run_folder, save_versions

log = logging.getLogger(__name__)

ROUND_COLUMNS = [
    "round",
    "site",
    "role",
    "c_index",
    "n",
    "n_events",
    "loss",
    "c_index_ipcw",
    "ibs",
    "missing_genes",
]
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
    ``min_events`` events for the fit's histogram and the KM curves) and the run would fail in round 0.
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
        for ids in [site.test_ids or site.all_ids] + ([site.case_ids] if site.role == "train" else []):
            events = int((censored.loc[list(ids)] == 0).sum())
            if len(ids) < policy.min_cases or events < policy.min_events:
                small.append(f"{site.name} ({len(ids)} cases, {events} events)")
                break
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        raise SiteError(
            f"federation={cfg.federation.get('name')}: {len(small)} of {len(sites)} site(s) hold fewer "
            f"than the sites' disclosure minimums (min_cases={policy.min_cases}, "
            f"min_events={policy.min_events}): "
            f"{shown}; use federation=per_cohort (one hospital per cohort) or a partition that merges small "
            "sites (federation=tcga_tss, federation.min_cases=N)"
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
    """``fedprog simulate``: federated run (or ``strategy=local|pooled`` baseline); prints a short summary."""
    from fedprog.data import CohortError

    try:
        cfg = prepare(cfg)
        check_site_sizes(cfg)
    except (
        CheckpointError,
        CohortError,
        RayAddressError,
        OSError,
    ) as error:  # a user or data error: one line, no traceback
        print(f"fedprog simulate: error: {' | '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    if str(cfg.strategy.name) in BASELINES:
        from fedprog.federated.baselines import run_baseline

        results = run_baseline(cfg)
    else:
        try:
            results = run_simulation(cfg)
        except FederationError as error:
            print(f"fedprog simulate: {_status(cfg)}: {error} -> {cfg.out}", file=sys.stderr)
            return 1
    head = results.get("headline", {})
    print(
        f"fedprog simulate [{results.get('strategy')}] {results.get('status')}: held-out C-index "
        f"(event-weighted over {head.get('heldout_sites_evaluated')} of {head.get('heldout_sites')} held-out "
        f"site(s)) {_fmt(head.get('heldout_c_index'))}, training sites {_fmt(head.get('train_c_index'))}"
        f" -> {results.get('out')}"
    )
    return 0 if results.get("status") == "completed" else 1


def _status(cfg: DictConfig) -> str:
    """The status results.json records for a run that raised (``failed`` when unreadable)."""
    import json

    try:
        return str(json.loads((Path(str(cfg.out)) / "results.json").read_text())["status"])
    except (OSError, ValueError, KeyError):
        return "failed"


def _fmt(value: Any) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
    )


# ------------------------------------------------------------------------------------------------ outputs
def write_outputs(
    out: Path,
    cfg: DictConfig,
    *,
    state: Any,
    sites: Sequence[Mapping[str, Any]],
    final_arrays: Mapping[str, np.ndarray] | None,
    status: str,
    message: str,
    prep: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write results.json, rounds.csv, report.md (+ PNGs), config.yaml, final weights; return the results."""
    from fedprog.federated.run_record import role_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame(state.rows, columns=[*ROUND_COLUMNS, *_extra_columns(state.rows)])
    rows.to_csv(out / "rounds.csv", index=False)
    final_round = int(rows["round"].max()) if len(rows) else 0
    final = rows[rows["round"] == final_round]
    final_records = final.to_dict("records")
    summary = {role: role_summary(final_records, role) for role in ("holdout", "train")}
    heldout = sorted(str(s["site"]) for s in sites if s.get("role") == "holdout")
    known = {str(s["site"]) for s in sites} | {str(s.get("cohort")) for s in sites}
    heldout += sorted(
        str(h) for h in (cfg.get("heldout") or []) if str(h) not in known
    )  # failed before describe
    covered = sorted({str(r["site"]) for r in final_records if r["role"] == "holdout"})
    sha = None
    if final_arrays is not None:
        np.savez(out / "final_weights.npz", **final_arrays)
        from fedprog.deploy.audit import sha256_arrays

        sha = sha256_arrays(final_arrays)
    results: dict[str, Any] = {
        "command": "simulate",
        "strategy": str(cfg.strategy.name),
        "status": status,
        "message": message,
        "out": str(out),
        "seed": int(cfg.seed),
        "rounds_planned": int(cfg.rounds),
        "rounds_completed": len(state.rounds),
        "weighting": str(cfg.get("weighting", "examples")),
        "headline": {
            "heldout_c_index": summary["holdout"]["c_index"],
            "train_c_index": summary["train"]["c_index"],
            "heldout_sites": len(heldout),
            "heldout_sites_evaluated": len(covered),
            "heldout_sites_missing": sorted(set(heldout) - set(covered)),
            "sites_failed": sorted({str(f["site"]) for f in getattr(state, "failures", [])}),
            "note": "event-weighted mean over the evaluated sites of the final round's Harrell C-index",
        },
        "summary": summary,
        "sites": list(sites),
        "final": final_records,
        "rounds": state.rounds,
        "rejections": state.rejections,
        "failures": getattr(state, "failures", []),
        "ceilings": _heldout_ceilings(cfg, heldout),
        "km": state.km,
        "bins": prep.get("bins"),
        "final_model_sha256": sha,
        "privacy": _privacy_summary(cfg, state.rounds),
        "environment": environment_info(),
        **(dict(extra) if extra else {}),
    }
    write_json(results, out / "results.json")
    save_run_config(cfg, out)
    _report(out, cfg, rows, results)
    return results


def _audit_sentence(anchor: Mapping[str, Any] | None) -> str:
    """The audit log's anchor in the report (``fedprog audit verify LOG expect=results.json`` checks it)."""
    if not anchor:
        return ""
    return f" Audit log: {anchor['entries']} entries, last hash `{anchor['last_hash']}`."


def _heldout_ceilings(cfg: DictConfig, heldout: Sequence[str]) -> dict[str, dict[str, float]]:
    """Oracle and transfer C-index ceilings of each held-out site, from a generated dataset's truth.csv.

    Empty for data without a generated truth (real cohorts). Held-out sites evaluate all their cases, so the
    ceilings are over the same patients as their C-index.
    """
    from fedprog.data.synth import TRUTH, site_ceilings

    root = Path(str(cfg.data.root))
    if not (root / TRUTH).is_file():
        return {}
    table = site_ceilings(root)
    whole = table[table["site"] == "all"].set_index(
        "cohort"
    )  # a site that is a whole cohort (partition=cohort)
    table = pd.concat([table[table["site"] != "all"].set_index("site"), whole])
    columns = ["oracle_c_index", "transfer_c_index"]
    return {site: {k: float(table.loc[site, k]) for k in columns} for site in heldout if site in table.index}


def _privacy_summary(cfg: DictConfig, rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The privacy mode and, with DP, the (epsilon, delta) spent after the last completed round."""
    mode = str((cfg.get("privacy") or {}).get("mode", "none"))
    out: dict[str, Any] = {"mode": mode}
    spent = [r["privacy"] for r in rounds if "privacy" in r]
    if spent:
        out.update(epsilon=spent[-1]["epsilon"], delta=spent[-1]["delta"])
    return out


def _failure_sentence(results: Mapping[str, Any]) -> str:
    failed = results["headline"]["sites_failed"]
    if not failed:
        return ""
    return f" **{len(failed)} site(s) failed** ({', '.join(failed)}): see Site failures."


def _privacy_sentence(privacy: Mapping[str, Any]) -> str:
    if privacy.get("mode", "none") == "none":
        return ""
    if "epsilon" not in privacy:
        return f" Privacy: {privacy['mode']}."
    return (
        f" Privacy: {privacy['mode']}, spent epsilon = {_fmt(privacy['epsilon'])} at delta = "
        f"{privacy['delta']:.3g}."
    )


def _extra_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    extra: list[str] = []
    for row in rows:
        extra.extend(k for k in row if k not in ROUND_COLUMNS and k not in extra)
    return extra


def plot_km_aggregate(site: str, km: Mapping[str, Any], path: Path) -> Path:
    """Plot the aggregate KM curves a site sent (median-split risk groups) with its log-rank p-value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    grid = np.asarray(km["km-grid"], dtype=float)
    for name, color in (("low", "tab:blue"), ("high", "tab:red")):
        curve = np.asarray(km[f"km-{name}"], dtype=float)
        label = f"{name} risk (n={int(km[f'km-n-{name}'])}, events={int(km[f'km-events-{name}'])})"
        ax.step(grid, curve, where="post", color=color, label=label)
    p = km.get("logrank-p", math.nan)
    p_label = f"log-rank p = {p:.3g}" if isinstance(p, float) and math.isfinite(p) else "log-rank p = n/a"
    ax.set(xlabel="time (months)", ylabel="survival probability", ylim=(0, 1.02), title=f"{site} (held out)")
    ax.legend(title=p_label, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _report(out: Path, cfg: DictConfig, rows: pd.DataFrame, results: Mapping[str, Any]) -> None:
    head = results["headline"]
    report = ReportBuilder(out, f"fedprog simulate: {results['strategy']}")
    report.section(
        "Run",
        f"Status **{results['status']}** after {results['rounds_completed']} of {results['rounds_planned']} "
        f"round(s){': ' + results['message'] if results['message'] else ''}. "
        f"Seed {results['seed']}, weighting by "
        f"{results['weighting']}. Held-out C-index (event-weighted over {head['heldout_sites_evaluated']} of "
        f"{head['heldout_sites']} held-out site(s)): **{_fmt(head['heldout_c_index'])}**; training sites "
        f"(in-sample): {_fmt(head['train_c_index'])}. Chance is 0.5"
        + (
            "; oracle and transfer ceilings of the generated truth beside each held-out site."
            if results.get("ceilings")
            else "."
        )
        + _failure_sentence(results)
        + _privacy_sentence(results["privacy"])
        + _audit_sentence(results.get("audit")),
    )
    if results["failures"]:
        report.table("Site failures", pd.DataFrame(results["failures"]))
    report.table("Sites", pd.DataFrame(results["sites"]))
    if len(rows):
        final = rows[rows["round"] == rows["round"].max()]
        final = final.drop(columns=["round"]).reset_index(drop=True)
        if results.get("ceilings"):
            ceilings = pd.DataFrame.from_dict(results["ceilings"], orient="index")
            final = final.join(ceilings[["oracle_c_index", "transfer_c_index"]], on="site")
        report.table("Final evaluation per site", final)
        summary = pd.DataFrame([{"role": role, **values} for role, values in results["summary"].items()])
        report.table("Summary (C-index weighted by events)", summary)
        if rows["round"].nunique() > 1 or "model" not in rows.columns:
            figure = plot_rounds(rows, out / "cindex_rounds.png", title="C-index per round per site")
            report.figure("C-index per round", figure)
    spent = [{"round": r["round"], **r["privacy"]} for r in results["rounds"] if "privacy" in r]
    if spent:
        title = f"Privacy spent ({results['privacy']['mode']}; NaN: no accountable guarantee)"
        report.table(title, pd.DataFrame(spent))
    if results["rejections"]:
        report.table("Updates left out", pd.DataFrame(results["rejections"]))
    for site, km in sorted(results["km"].items()):
        if km.get("km-grid"):
            try:
                path = safe_output_path(out, f"km_{site}.png")
            except UnsafePathError as error:
                log.warning("no KM plot for site %r: %s", site[:40], error)
                report.section(f"Kaplan-Meier: {site[:40]!r}", f"not drawn: {error}")
                continue
            report.figure(f"Kaplan-Meier of predicted risk groups: {site}", plot_km_aggregate(site, km, path))
    env = results["environment"]
    report.section("Environment", ", ".join(f"{k} {v}" for k, v in env.items()))
    report.write()
