"""Baselines on the federation's data, engine and seeds: local-only and pooled (centralized) training.

``strategy=local``: every training site trains its own model on its own cases (preprocessing fitted on that
site alone, as a hospital without a federation would) and each model is evaluated on every site.
``strategy=pooled``: one model trained on the union of the training sites (preprocessing fitted on the union),
evaluated on every site: the upper reference a federation tries to reach. The training budget is
``baseline.epochs`` (default: ``rounds * training.epochs``, the federation's total local epochs).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fedprog import engine
from fedprog.data import DatasetLayout, Site, SurvivalDataset, build_sites, load_cohorts
from fedprog.federated.federation import derived_seed, km_aggregates
from fedprog.federated.outputs import RunState, write_outputs
from fedprog.pipeline import PooledDataset, Preprocessing, build_model, fit_preprocessing, make_dataset

log = logging.getLogger(__name__)


def _dataset(
    site: Site, cohort: Any, ids: tuple[str, ...], prep: Preprocessing, cfg: DictConfig
) -> SurvivalDataset:
    """A site's dataset with the training preprocessing; its missing feature genes are imputed and counted.

    Site standardization (``data.site_standardize``) uses the site's own cases, as in the federation."""
    return make_dataset(
        cohort,
        list(ids),
        prep,
        max_patches=cfg.training.get("max_patches"),
        seed=int(cfg.seed),
        site=site.name,
        site_cases=site.all_ids,
    )


def _train_config(cfg: DictConfig, seed: int) -> engine.TrainConfig:
    values = OmegaConf.to_container(cfg.training, resolve=True)
    assert isinstance(values, dict)
    epochs = cfg.baseline.get("epochs") or int(cfg.rounds) * int(values.get("epochs", 1))
    values.update(epochs=int(epochs), seed=seed)
    if values.get("local_steps"):
        values["local_steps"] = int(values["local_steps"]) * int(cfg.rounds)
    return engine.TrainConfig.from_cfg(values)


def train_and_evaluate(
    cfg: DictConfig,
    name: str,
    train_sites: list[Site],
    all_sites: list[Site],
    cohorts: dict[str, Any],
    layout: Any,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Fit preprocessing on ``train_sites``, train one model on them and evaluate it on every site.

    Returns
    -------
    rows : list of dict
        One row per evaluated site (rounds.csv columns plus ``model``).
    km : dict
        Aggregate KM curves of each held-out site (same format as the federated clients send).
    """
    prep = fit_preprocessing(layout, cohorts, _cases_by_cohort(train_sites), n_bins=int(cfg.n_bins))
    train_sets = [_dataset(s, cohorts[s.cohort], s.case_ids, prep, cfg) for s in train_sites]
    train_ds = train_sets[0] if len(train_sets) == 1 else PooledDataset(train_sets)
    torch.manual_seed(int(cfg.seed))
    model = build_model(
        OmegaConf.to_container(cfg.model, resolve=True), train_sets[0], loss=str(cfg.training.loss)
    )
    train_cfg = _train_config(cfg, derived_seed(int(cfg.seed), 0, name))
    history = engine.train(model, train_ds, train_cfg, progress=False, log_prefix=f"[{name}] ")
    log.info("baseline model %s: %d steps, final loss %.4f", name, history.n_steps, history.loss)
    rows, km = [], {}
    grid = torch.linspace(0.0, float(cfg.report.km_grid_max), int(cfg.report.km_grid_points)).numpy()
    for site in all_sites:
        ids = site.test_ids if site.test_ids else site.all_ids
        data = _dataset(site, cohorts[site.cohort], ids, prep, cfg)
        result = engine.evaluate(
            model,
            data,
            bins=prep.bins,
            loss_cfg=train_cfg,
            train_times=train_ds.times,  # censoring reference of the IPCW metrics: the training cases
            train_censorship=train_ds.censorship,
        )
        m = result.metrics
        rows.append(
            {
                "round": int(cfg.rounds),
                "site": site.name,
                "role": site.role,
                "c_index": float(m.get("c_index", math.nan)),
                "n": int(m.get("n", len(data))),
                "n_events": int(m.get("n_events", data.n_events)),
                "loss": float(m.get("loss", math.nan)),
                "c_index_ipcw": float(m.get("c_index_ipcw", math.nan)),
                "ibs": float(m.get("ibs", math.nan)),
                "model": name,
                "missing_genes": len(data.missing_genes),
            }
        )
        if site.role == "holdout":
            km[f"{site.name}@{name}"] = {
                **km_aggregates(result.time, result.censorship, result.risk, grid),
                "logrank-p": float(m.get("logrank_p", math.nan)),
            }
    return rows, km


def _cases_by_cohort(sites: list[Site]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for site in sites:
        out.setdefault(site.cohort, []).extend(site.case_ids)
    return out


def run_baseline(cfg: DictConfig) -> dict[str, Any]:
    """Run ``strategy=local`` or ``strategy=pooled`` and write the same outputs as a federated run."""
    layout = DatasetLayout.load(cfg.data)
    heldout = cfg.get("heldout")
    sites = build_sites(layout, cfg.federation, None if heldout is None else list(heldout))
    cohorts = load_cohorts(layout, list(dict.fromkeys(s.cohort for s in sites)))
    train_sites = [s for s in sites if s.role == "train"]
    if not train_sites:
        raise ValueError(f"strategy={cfg.strategy.name}: no training site among {[s.name for s in sites]}")
    state = RunState()
    if cfg.strategy.name == "pooled":
        groups = [("pooled", train_sites)]
    else:
        groups = [(s.name, [s]) for s in train_sites]
    for name, members in groups:
        rows, km = train_and_evaluate(cfg, name, members, sites, cohorts, layout)
        state.rows.extend(rows)
        state.km.update(km)
    state.rounds.append({"round": int(cfg.rounds), "accepted": [s.name for s in train_sites], "rejected": []})
    lacking: dict[str, int] = {}
    for row in state.rows:
        lacking[row["site"]] = max(lacking.get(row["site"], 0), int(row["missing_genes"]))
    site_table = [
        {
            "site": s.name,
            "role": s.role,
            "cohort": s.cohort,
            "n_cases": len(s.all_ids),
            "missing_genes": lacking.get(
                s.name, 0
            ),  # feature genes imputed at the training mean (max over models)
        }
        for s in sites
    ]
    return write_outputs(
        Path(str(cfg.out)),
        cfg,
        state=state,
        sites=site_table,
        final_arrays=None,
        status="completed",
        message="",
        prep={},
        extra={"baseline_models": [name for name, _ in groups]},
    )
