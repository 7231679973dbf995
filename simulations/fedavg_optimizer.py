"""FedAvg without Flower: client optimizer reset every round vs kept across rounds, and FedAvg rotations.

Same engine, sites, preprocessing and seeds as ``fedprog simulate`` (client seed = f(seed, round, site)), but
the rounds run in-process, so the comparison isolates the optimizer. Usage::

    PYTHONPATH=. python simulations/fedavg_optimizer.py --seeds 0 1 2 --rounds 10 \\
        --setting radam-reset:radam:false --setting adam-kept:adam:true [hydra overrides ...]

prints one row per (setting, seed): held-out C-index (each held-out site and their mean) and the mean
in-sample C-index of the training sites. With ``--rotation OUT`` every cohort is held out in turn (the others
train) and each setting writes ``OUT/<label>/rotation.json`` and ``predictions.csv.gz`` (for compare.py).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from fedprog import engine
from fedprog.compare import prediction_frame
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


def _train_config(cfg: DictConfig, optimizer: str, keep: bool) -> dict[str, Any]:
    training = OmegaConf.to_container(cfg.training, resolve=True)
    known = set(engine.TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in training.items() if k in known}
    return values | {"optimizer": optimizer, "keep_optimizer_state": keep}


def run_fedavg(cfg: DictConfig, optimizer: str, keep: bool) -> tuple[dict[str, Any], pd.DataFrame]:
    """FedAvg over ``cfg.rounds`` rounds; return final per-site (role, C-index) and held-out predictions."""
    layout = prepare_layout(cfg.data)
    sites = build_sites(layout, cfg.federation, list(cfg.heldout))
    cohorts = {s.cohort: s.load_cohort(layout) for s in sites}
    train_sites = [s for s in sites if s.role == "train"]
    by_cohort: dict[str, list[str]] = {}
    for site in train_sites:
        by_cohort.setdefault(site.cohort, []).extend(site.case_ids)
    prep = fit_preprocessing(layout, cohorts, by_cohort, n_bins=int(cfg.n_bins))
    seed, max_patches = int(cfg.seed), cfg.training.get("max_patches")

    def dataset(site, ids):
        return make_dataset(cohorts[site.cohort], ids, prep, max_patches=max_patches, seed=seed)

    train_sets = {s.name: dataset(s, s.case_ids) for s in train_sites}
    base = _train_config(cfg, optimizer, keep)
    torch.manual_seed(seed)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = build_model(model_cfg, next(iter(train_sets.values())), loss="nll")
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
    scores, predictions = {}, []
    for site in sites:
        ids = site.test_ids if site.test_ids else site.all_ids
        result = engine.evaluate(model, dataset(site, ids), bins=prep.bins)
        scores[site.name] = (site.role, float(result.metrics["c_index"]))
        if site.role == "holdout":
            predictions.append(
                prediction_frame(
                    site.cohort, seed, site.name, result.case_ids, result.time, result.censorship, result.risk
                )
            )
    return scores, pd.concat(predictions, ignore_index=True)


def main() -> None:
    """Parse arguments, run every (setting, [target,] seed), print the table and a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--setting", action="append", help="label:optimizer:keep (true|false)")
    parser.add_argument("--rotation", default=None, help="output folder: hold out every cohort in turn")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    settings = args.setting or ["radam-reset:radam:false", "adam-kept:adam:true"]
    torch.set_num_threads(1)
    summary: dict[str, dict[str, list[float]]] = {}
    for setting in settings:
        label, optimizer, keep = setting.split(":")
        targets = [None]
        if args.rotation:
            targets = list(load_config("simulate", args.overrides).data.cohorts)
        frames = []
        for target in targets:
            heldout = [] if target is None else [f"heldout=[{target}]"]
            for seed in args.seeds:
                overrides = [f"seed={seed}", f"rounds={args.rounds}", *args.overrides, *heldout]
                started = time.perf_counter()
                scores, predictions = run_fedavg(
                    load_config("simulate", overrides), optimizer, keep == "true"
                )
                frames.append(predictions)
                held = [c for role, c in scores.values() if role == "holdout"]
                insample = [c for role, c in scores.values() if role == "train"]
                row = summary.setdefault(label, {"heldout": [], "in_sample": []})
                row["heldout"].append(float(np.mean(held)))
                row["in_sample"].append(float(np.mean(insample)))
                sites = ", ".join(f"{n} {c:.3f}" for n, (r, c) in scores.items() if r == "holdout")
                print(
                    f"{label:<14} seed {seed}: held-out {np.mean(held):.3f} ({sites}), "
                    f"in-sample {np.mean(insample):.3f}  [{time.perf_counter() - started:.0f}s]",
                    flush=True,
                )
        if args.rotation:
            _write(args.rotation, label, optimizer, keep, args, pd.concat(frames, ignore_index=True))
    for label, row in summary.items():
        sd = np.std(row["heldout"], ddof=1) if len(row["heldout"]) > 1 else float("nan")
        print(
            f"{label:<14} held-out {np.mean(row['heldout']):.3f} +- {sd:.3f}, "
            f"in-sample {np.mean(row['in_sample']):.3f}"
        )
    print(json.dumps(summary))


def _write(
    out: str, label: str, optimizer: str, keep: str, args: argparse.Namespace, frame: pd.DataFrame
) -> None:
    from pathlib import Path

    from fedprog.compare import write_rotation
    from fedprog.data.synth import read_truth

    cfg = load_config("simulate", args.overrides)
    folder = Path(out) / label
    folder.mkdir(parents=True, exist_ok=True)
    setting = {"label": label, "command": "fedavg (in-process)", "strategy": "fedavg", "optimizer": optimizer}
    setting |= {"keep_optimizer_state": keep == "true", "rounds": args.rounds, "model": cfg.model.name}
    summary = write_rotation(folder, setting, frame, truth=read_truth(cfg.data.root))
    print(summary.to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
