"""Baseline measurement: label-free per-site standardization of WSI features (``data.site_standardize``).

Prints (a) the spread across hospitals of the per-site channel means (and log stds) of the WSI patch features
before and after standardization, on the generated default (``data=synth``, generated under
``runs/data/synth`` when missing), and (b) the held-out C-index with the option off vs on: centralized
training through ``fedprog train``'s own code (:func:`fedprog.protocol.run_source`), sources = every cancer
but the target, the same seeds for both settings, per-seed values and the paired mean difference (on - off).

    python simulations/site_norm.py                                  # target c5, seeds 0 1, 10 epochs
    python simulations/site_norm.py --target c3 --seeds 0 1 2 --epochs 10 model=mcat modules=cade
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from fedprog.config import load_config
from fedprog.data import DatasetLayout, load_cohorts
from fedprog.data.bags import read_case_bags
from fedprog.data.cohort import SITE, Cohort
from fedprog.data.site_norm import site_standardizers
from fedprog.protocol import prepare_layout, run_source

# Small, CPU-sized runs (2 cores): the cross_cancer.py `synth` preset's width, few epochs, one thread.
COMMON = ["data=synth", "model.dim=64", "km_plots=false", "training.num_threads=1"]


def site_moments(cohort: Cohort, standardize: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Hospital -> (channel mean, channel std) of all its patches, raw or site-standardized."""
    ids = [str(c) for c in cohort.labels.index]
    norm = site_standardizers(cohort, ids, ids) if standardize else {}
    sites = cohort.labels[SITE].astype(str)
    out = {}
    for site in sorted(set(sites)):
        bags = []
        for case in (c for c in ids if sites.loc[c] == site):
            bag = read_case_bags(cohort.bag_paths[case], case_id=case, cohort=cohort.name)
            bags.append(norm[case].apply(bag) if standardize else bag)
        patches = torch.cat(bags).double()
        out[f"{cohort.name}-{site}"] = (patches.mean(0).numpy(), patches.std(0, unbiased=False).numpy())
    return out


def style_spread(layout: DatasetLayout) -> None:
    """Print the across-site spread of the per-site channel means and log stds, raw and standardized."""
    cohorts = load_cohorts(layout)
    for standardize in (False, True):
        moments = {k: v for c in cohorts.values() for k, v in site_moments(c, standardize).items()}
        means = np.stack([m for m, _ in moments.values()])
        log_stds = np.log(np.stack([s for _, s in moments.values()]))
        flag = str(standardize).lower()
        print(
            f"(a) site_standardize={flag:5s}: {len(moments)} sites, across-site sd (channel average) of the "
            f"channel means {means.std(0).mean():.4f}, of the channel log stds {log_stds.std(0).mean():.4f}"
        )


def heldout_cindex(target: str, seeds: list[int], epochs: int, overrides: list[str]) -> None:
    """Train on every other cancer, evaluate on ``target``; option off vs on, paired by seed."""
    values: dict[bool, list[float]] = {False: [], True: []}
    for standardize in (False, True):
        cfg = load_config(
            "train",
            [
                *COMMON,
                f"training.epochs={epochs}",
                f"data.site_standardize={str(standardize).lower()}",
                *overrides,
            ],
        )
        layout = prepare_layout(cfg.data)
        cohorts = load_cohorts(layout)
        sources = [c for c in cohorts if c != target]
        for seed in seeds:
            start = time.time()
            records = run_source(cfg, layout, cohorts, sources, seed, targets=[target])
            value = next(r["c_index"] for r in records if r["split"] == "target")
            values[standardize].append(float(value))
            print(
                f"(b) site_standardize={str(standardize).lower():5s} seed {seed}: held-out {target} C-index "
                f"{value:.3f} ({time.time() - start:.0f} s)",
                flush=True,
            )
    diff = np.asarray(values[True]) - np.asarray(values[False])
    off = " / ".join(f"{v:.3f}" for v in values[False])
    on = " / ".join(f"{v:.3f}" for v in values[True])
    print(f"(b) held-out {target}, seeds {seeds}: off {off}, on {on}")
    print(f"site_norm: paired mean difference (on - off) {diff.mean():+.3f} over {len(diff)} seed(s)")


def main() -> None:
    """Parse the arguments and run both measurements."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="c5", help="held-out cancer (the sources are all the others)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (both settings)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    style_spread(prepare_layout(load_config("train", [*COMMON, *args.overrides]).data))
    heldout_cindex(args.target, list(args.seeds), int(args.epochs), list(args.overrides))


if __name__ == "__main__":
    main()
