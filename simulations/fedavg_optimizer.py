"""FedAvg without Flower on the generated default: client optimizer reset every round vs kept across rounds.

Same engine, sites, preprocessing and seeds as ``fedprog simulate`` (client seed = f(seed, round, site)), but the
rounds run in-process, so the comparison isolates the optimizer. Usage::

    PYTHONPATH=. python simulations/fedavg_optimizer.py --seeds 0 1 2 --rounds 10 \
        --setting radam-reset:radam:false --setting adam-kept:adam:true [hydra overrides ...]

Prints one row per (setting, seed): held-out C-index (each held-out site and their mean) and the mean
in-sample C-index of the training sites.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fedprog import engine
from fedprog.config import load_config
from fedprog.data import build_sites
from fedprog.federated.federation import derived_seed
from fedprog.pipeline import build_model, fit_preprocessing, make_dataset
from fedprog.protocol import prepare_layout


def _average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of the client models (integer buffers keep their dtype)."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        mean = sum(w / total * s[key].double() for s, w in zip(states, weights, strict=True))
        out[key] = mean.to(first.dtype)
    return out


def run_fedavg(cfg: DictConfig, optimizer: str, keep: bool) -> dict[str, Any]:
    """FedAvg over ``cfg.rounds`` rounds; return the final per-site C-index (held-out and in-sample)."""
    layout = prepare_layout(cfg.data)
    sites = build_sites(layout, cfg.federation, list(cfg.heldout))
    cohorts = {s.cohort: s.load_cohort(layout) for s in sites}
    train_sites = [s for s in sites if s.role == "train"]
    by_cohort: dict[str, list[str]] = {}
    for site in train_sites:
        by_cohort.setdefault(site.cohort, []).extend(site.case_ids)
    prep = fit_preprocessing(layout, cohorts, by_cohort, n_bins=int(cfg.n_bins))
    seed = int(cfg.seed)

    def dataset(site, ids):
        return make_dataset(cohorts[site.cohort], ids, prep, max_patches=cfg.training.get("max_patches"), seed=seed)

    train_sets = {s.name: dataset(s, s.case_ids) for s in train_sites}
    training = OmegaConf.to_container(cfg.training, resolve=True)
    known = set(engine.TrainConfig.__dataclass_fields__)
    base = {k: v for k, v in training.items() if k in known} | {"optimizer": optimizer, "keep_optimizer_state": keep}
    torch.manual_seed(seed)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), next(iter(train_sets.values())), loss="nll")
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kept: dict[str, dict[str, torch.Tensor] | None] = {name: None for name in train_sets}
    rounds = int(cfg.rounds)
    for server_round in range(1, rounds + 1):
        states, weights = [], []
        for name, data in train_sets.items():
            site_seed = derived_seed(seed, server_round, name)
            data.seed = site_seed
            data.set_epoch(0)
            model.load_state_dict(global_state)
            history = engine.train(
                model,
                data,
                engine.TrainConfig.from_cfg(base, seed=site_seed),
                progress=False,
                optimizer_state=kept[name],
                run_position=engine.RunPosition(server_round - 1, rounds),
            )
            kept[name] = history.optimizer_state
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(data))
        global_state = _average(states, weights)
    model.load_state_dict(global_state)
    scores = {}
    for site in sites:
        ids = site.test_ids if site.test_ids else site.all_ids
        result = engine.evaluate(model, dataset(site, ids), bins=prep.bins)
        scores[site.name] = (site.role, float(result.metrics["c_index"]))
    return scores


def main() -> None:
    """Parse arguments, run every (setting, seed), print the table and a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--setting", action="append", help="label:optimizer:keep (true|false)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    settings = args.setting or ["radam-reset:radam:false", "adam-kept:adam:true"]
    torch.set_num_threads(1)
    summary: dict[str, dict[str, list[float]]] = {}
    for setting in settings:
        label, optimizer, keep = setting.split(":")
        for seed in args.seeds:
            cfg = load_config("simulate", [f"seed={seed}", f"rounds={args.rounds}", *args.overrides])
            started = time.perf_counter()
            scores = run_fedavg(cfg, optimizer, keep == "true")
            held = [c for role, c in scores.values() if role == "holdout"]
            insample = [c for role, c in scores.values() if role == "train"]
            row = summary.setdefault(label, {"heldout": [], "in_sample": []})
            row["heldout"].append(float(np.mean(held)))
            row["in_sample"].append(float(np.mean(insample)))
            print(
                f"{label:<14} seed {seed}: held-out {np.mean(held):.3f} "
                f"({', '.join(f'{n} {c:.3f}' for n, (r, c) in scores.items() if r == 'holdout')}), "
                f"in-sample {np.mean(insample):.3f}  [{time.perf_counter() - started:.0f}s]",
                flush=True,
            )
    for label, row in summary.items():
        print(
            f"{label:<14} held-out {np.mean(row['heldout']):.3f} +- {np.std(row['heldout'], ddof=1):.3f}, "
            f"in-sample {np.mean(row['in_sample']):.3f}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
