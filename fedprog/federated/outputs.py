"""The outputs of a federated run (and of the local/pooled baselines, which write the same ones).

:class:`RunState` is what the server accumulates over a run (per-site rows, round summaries, rejections,
failures, KM curves); :func:`write_outputs` turns it into ``results.json``, ``rounds.csv``, ``report.md`` with
PNG plots and the final weights; :func:`role_summary` is the event-weighted headline of one role.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fedprog.report import (
    ReportBuilder,
    UnsafePathError,
    environment_info,
    plot_km_aggregate,
    plot_rounds,
    safe_output_path,
    save_run_config,
)
from fedprog.results import write_results

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


def fmt_value(value: Any) -> str:
    """A metric with 3 decimals, ``n/a`` when missing or not finite."""
    return (
        "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
    )


@dataclass
class RunState:
    """What the server accumulates over a run (per-site rows, rejections, failures, KM, round summaries)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    km: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)


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
        from fedprog.audit import sha256_arrays

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
    write_results(out, "simulate", results)
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
        f" Privacy: {privacy['mode']}, spent epsilon = {fmt_value(privacy['epsilon'])} at delta = "
        f"{privacy['delta']:.3g}."
    )


def _training_cases(cfg: DictConfig) -> str:
    """What the training sites' C-index is measured on: their own training cases, or a held-back split."""
    federation = cfg.get("federation") or {}
    if federation.get("split_column"):
        return "their local test splits"
    if federation.get("val_fraction"):
        return f"their {float(federation.val_fraction):.0%} validation splits"
    return "in-sample"


def _extra_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    extra: list[str] = []
    for row in rows:
        extra.extend(k for k in row if k not in ROUND_COLUMNS and k not in extra)
    return extra


def _report(out: Path, cfg: DictConfig, rows: pd.DataFrame, results: Mapping[str, Any]) -> None:
    head = results["headline"]
    report = ReportBuilder(out, f"fedprog simulate: {results['strategy']}")
    report.section(
        "Run",
        f"Status **{results['status']}** after {results['rounds_completed']} of {results['rounds_planned']} "
        f"round(s){': ' + results['message'] if results['message'] else ''}. "
        f"Seed {results['seed']}, weighting by "
        f"{results['weighting']}. Held-out C-index (event-weighted over {head['heldout_sites_evaluated']} of "
        f"{head['heldout_sites']} held-out site(s)): **{fmt_value(head['heldout_c_index'])}**; training "
        f"sites ({_training_cases(cfg)}): {fmt_value(head['train_c_index'])}. Chance is 0.5"
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
