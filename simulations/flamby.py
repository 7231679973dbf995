"""Benchmark (issue #4): FLamby Fed-TCGA-BRCA - FedAvg, FedProx, FedAdam under FLamby's protocol.

Reproduces FLamby's federated benchmark on its 6 regional centers (``data=fed_tcga_brca
federation=fed_tcga_brca model=linear_cox heldout=null``; the data and the published table:
``<shared>/data/fed_tcga_brca/README.md``) and puts our numbers beside theirs:

- protocol: linear Cox 39 -> 1, batch-level Cox partial likelihood, batch size 8, 100 local SGD steps per
  round, 5 rounds, raw (unstandardized) features, client weights by training examples; FedAvg/FedProx client
  lr 0.1 (FedProx mu 0.1); FedAdam client lr 0.01, server lr 0.1, betas 0.9/0.999, tau 1e-8; seeds 42-46;
- metric: Harrell's C-index on each of the 6 local test sets (FLamby's "mean over client test sets" is their
  plain mean) and on the pooled test set (222 patients). The federated run reports the per-center values
  itself (rounds.csv); the pooled-test value is computed here from the run's final global weights and
  fitted preprocessing (this script plays the role of an analyst holding the pooled test set, which no
  federation participant does);
- reference of the issue: a pooled ridge Cox (scikit-survival ``CoxPHSurvivalAnalysis(alpha=1)`` on
  features standardized with the pooled-train moments) fitted on the pooled train split (issue: 0.817 mean
  per-center test C-index, 0.840 pooled test C-index). Target: each federated strategy within ``TOLERANCE`` of
  it, with a seed spread (sample sd of the per-seed mean over centers) of at most ``MAX_SEED_SD``.

Extra rows (``--extras NAME ...``, clearly labelled, not FLamby's protocol; see ``EXTRAS``): FedAdam with
FLamby's (uncorrected) server step size, FedAvg/FedProx with FLamby's loss scale, features standardized from
training-site aggregates (``data.tabular.standardize=true``) and more rounds.

Raw outputs: ``runs/benchmarks/flamby/<run>/`` (git-ignored); completed runs are not run again.

    python simulations/flamby.py                    # ridge reference + 3 strategies x 5 seeds
    python simulations/flamby.py --extras           # + the labelled extra rows
    python simulations/flamby.py --reference-only   # only the ridge reference (no Flower)
    python simulations/flamby.py --strategies newton  # federated Newton beside the reference
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedprog.report import markdown_table, write_json

log = logging.getLogger("simulations.flamby")

OUT_ROOT = Path("runs/benchmarks/flamby")
SEEDS = (42, 43, 44, 45, 46)
RIDGE_ALPHA = 1.0
TOLERANCE = 0.01  # target: |federated - pooled ridge| on both metrics
MAX_SEED_SD = 0.03  # target: sd over seeds of the per-seed mean over centers
ISSUE_REFERENCE = {"mean_over_centers": 0.817, "pooled_test": 0.840}
RUN_TIMEOUT_S = 1800

#: FLamby's published numbers (README of the data folder): mean over client test sets, sd over seeds, pooled.
PUBLISHED = {
    "fedavg": (0.732, 0.181, 0.735),
    "fedprox": (0.729, 0.168, 0.717),
    "fedadam": (0.815, 0.026, 0.842),
    "pooled": (0.676, 0.095, 0.704),
}

DATA = ["data=fed_tcga_brca", "federation=fed_tcga_brca", "model=linear_cox", "heldout=null"]
PROTOCOL = [
    "rounds=5",
    "training.loss=cox",
    "training.batch_size=8",
    "training.grad_accum=1",
    "training.local_steps=100",
    "training.optimizer=sgd",
    "training.momentum=0.0",
    "training.weight_decay=0.0",
    "training.scheduler=constant",
    "training.balanced_sampling=false",
    "training.select_on=last",
    "training.max_grad_norm=null",
    "weighting=examples",
    "max_update_norm=null",
]
#: Federated Newton (``strategy=newton``, not FLamby's protocol: no local SGD steps): each center sends its
#: Cox likelihood's gradient and Hessian, the server steps on their sum. Features standardized from
#: training-site aggregates, and the reference's ridge (sksurv's ``alpha`` penalizes the summed
#: log-likelihood, Newton's ``weight_decay`` the mean over events: alpha / training events). Each center is
#: its own stratum.
TRAIN_EVENTS = 119
NEWTON = [
    "strategy=newton",
    "data.tabular.standardize=true",
    f"training.weight_decay={RIDGE_ALPHA / TRAIN_EVENTS:.6g}",
]
STRATEGY_OVERRIDES = {
    "fedavg": ["strategy=fedavg", "training.lr=0.1"],
    "fedprox": ["strategy=fedprox", "strategy.proximal_mu=0.1", "training.lr=0.1"],
    "fedadam": [
        "strategy=fedadam",
        "training.lr=0.01",
        "strategy.eta=0.1",
        "strategy.beta_1=0.9",
        "strategy.beta_2=0.999",
        "strategy.tau=1e-8",
    ],
    "newton": NEWTON,
}
#: The strategies of FLamby's table (the default of ``--strategies``); ``newton`` is an extra strategy.
FLAMBY_STRATEGIES = ("fedavg", "fedprox", "fedadam")
#: FLamby's batch Cox loss is the mean over the batch of event-masked terms; ours (fedprog.survival.losses)
#: is the mean over the batch's events. Ours is larger by batch / events-in-batch: scaling the client lr by
#: the training event rate (TRAIN_EVENTS / 866) puts the two on the same expected step.
EVENT_RATE = TRAIN_EVENTS / 866
#: Labelled extra rows (not FLamby's protocol): name -> (strategies it applies to, extra overrides).
EXTRAS: dict[str, tuple[tuple[str, ...], list[str]]] = {
    # Flower's FedAdam bias-corrects the server step (eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)), ~0.2-0.25 eta
    # over rounds 1-5); FLamby's FedAdam does not. eta 0.5 gives FLamby's step size over those rounds.
    "eta 0.5": (("fedadam",), ["strategy.eta=0.5"]),
    "FLamby loss scale": (
        ("fedavg", "fedprox"),
        [f"training.lr={0.1 * EVENT_RATE:.5f}"],
    ),
    "std": (("fedavg", "fedprox", "fedadam"), ["data.tabular.standardize=true"]),
    "20 rounds": (("fedavg", "fedprox", "fedadam"), ["rounds=20"]),
}


class FlambyBenchmarkError(RuntimeError):
    """A run of the benchmark failed or its outputs are unusable; the message names the run folder."""


@dataclass(frozen=True)
class Federation:
    """The Fed-TCGA-BRCA cohort and its 6 sites, loaded through fedprog's own loader."""

    layout: Any
    cohort: Any
    sites: list[Any]

    @classmethod
    def load(cls) -> Federation:
        """Load the data and sites as ``fedprog simulate`` does."""
        from fedprog.config import load_config
        from fedprog.data import DatasetLayout, build_sites

        cfg = load_config("simulate", DATA)
        layout = DatasetLayout.load(cfg.data)
        sites = build_sites(layout, cfg.federation, None)
        cohort = sites[0].load_cohort(layout)
        return cls(layout, cohort, sites)

    def split(self, part: str) -> dict[str, list[str]]:
        """Case ids per site of the ``train`` or ``test`` split."""
        return {s.name: list(s.case_ids if part == "train" else s.test_ids) for s in self.sites}


# ------------------------------------------------------------------------------------------ ridge reference
def cindex(time_: np.ndarray, censorship: np.ndarray, risk: np.ndarray, where: str) -> float:
    """Harrell's C-index; NaN (logged) when the set has no comparable pair."""
    from fedprog.survival.metrics import harrell_cindex

    try:
        return harrell_cindex(time_, censorship, risk)
    except ValueError as error:
        log.warning("C-index of %s is NaN: %s", where, error)
        return math.nan


def scores(fed: Federation, risk_of: Any) -> dict[str, Any]:
    """Per-center test C-index, their plain mean (FLamby) and the pooled-test C-index of ``risk_of(ids)``."""
    labels = fed.cohort.labels
    per_center, pooled_ids, pooled_risk = {}, [], []
    for site, ids in fed.split("test").items():
        risk = np.asarray(risk_of(ids), dtype=float)
        per_center[site] = cindex(
            labels.loc[ids, "survival_months"].to_numpy(),
            labels.loc[ids, "censorship"].to_numpy(),
            risk,
            site,
        )
        pooled_ids += ids
        pooled_risk.append(risk)
    pooled = cindex(
        labels.loc[pooled_ids, "survival_months"].to_numpy(),
        labels.loc[pooled_ids, "censorship"].to_numpy(),
        np.concatenate(pooled_risk),
        "pooled test set",
    )
    return {
        "per_center": per_center,
        "mean_over_centers": float(np.nanmean(list(per_center.values()))),
        "pooled_test": pooled,
    }


def ridge_reference(fed: Federation, alpha: float = RIDGE_ALPHA) -> dict[str, Any]:
    """The issue's reference: pooled ridge Cox on standardized features, fitted on the pooled train split."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    table = fed.cohort.tables[str(fed.layout.strong)].astype(float)
    labels = fed.cohort.labels
    train_ids = [c for ids in fed.split("train").values() for c in ids]
    mean = table.loc[train_ids].mean()
    std = table.loc[train_ids].std(ddof=0).replace(0.0, 1.0)

    def standardized(ids: list[str]) -> np.ndarray:
        return ((table.loc[ids] - mean) / std).to_numpy()

    y = Surv.from_arrays(
        event=labels.loc[train_ids, "censorship"].to_numpy() == 0,
        time=labels.loc[train_ids, "survival_months"].to_numpy(),
    )
    model = CoxPHSurvivalAnalysis(alpha=alpha).fit(standardized(train_ids), y)
    result = scores(fed, lambda ids: model.predict(standardized(ids)))
    result.update(alpha=alpha, n_train=len(train_ids), n_features=table.shape[1])
    return result


# ------------------------------------------------------------------------------------------ federated runs
def run_name(strategy: str, extra: str | None, seed: int) -> str:
    """Folder name of one run."""
    suffix = "" if extra is None else "_" + "".join(c if c.isalnum() or c == "." else "-" for c in extra)
    return f"{strategy}{suffix}_s{seed}"


def overrides_for(strategy: str, extra: str | None, seed: int) -> list[str]:
    """The exact Hydra overrides of one run (FLamby protocol, strategy settings, extra row, seed)."""
    return [
        *DATA,
        *PROTOCOL,
        *STRATEGY_OVERRIDES[strategy],
        *(EXTRAS[extra][1] if extra else []),
        f"seed={seed}",
    ]


def _completed(out: Path) -> dict[str, Any] | None:
    path = out / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("status") == "completed" else None


def run_federated(overrides: list[str], out: Path) -> dict[str, Any]:
    """Run ``fedprog simulate`` (a fresh process; skipped when completed results exist); return results."""
    done = _completed(out)
    if done is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("fedprog")), "simulate", *overrides, f"out={out}"]
    started = time.perf_counter()
    with open(out / "simulate.log", "w") as stream:
        code = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=False
        ).returncode
    done = _completed(out)
    if code != 0 or done is None:
        raise FlambyBenchmarkError(f"run {out} failed (exit {code}); see {out / 'simulate.log'}")
    (out / "wall_seconds.json").write_text(json.dumps({"wall_s": time.perf_counter() - started}))
    return done


def score_run(fed: Federation, out: Path) -> dict[str, Any]:
    """Score a finished run's final global model on every local test set and on the pooled test set.

    The model and preprocessing come from the run's last checkpoint (weights + fitted tabular transform);
    predictions use the engine's ``predict``, the same code the clients run. The per-center values are
    checked against the ones the sites reported in the final round of ``rounds.csv``.
    """
    import torch

    from fedprog.engine import predict
    from fedprog.federated.checkpoint import load_checkpoint
    from fedprog.pipeline import Preprocessing, build_model, make_dataset

    checkpoint = load_checkpoint(out)
    prep = Preprocessing.from_state_dict(checkpoint.federation["prep"])
    model_cfg = checkpoint.config["model"]
    loss = str(checkpoint.config["training"]["loss"])

    def risk_of(ids: list[str]) -> np.ndarray:
        data = make_dataset(fed.cohort, ids, prep)
        model = build_model(model_cfg, data, loss=loss)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in checkpoint.arrays.items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, risk, _ = predict(model, data, batch_size=len(ids))
        return risk

    result = scores(fed, risk_of)
    rounds = pd.read_csv(out / "rounds.csv")
    final = rounds[rounds["round"] == rounds["round"].max()].set_index("site")["c_index"]
    for site, value in result["per_center"].items():
        reported = float(final.get(site, math.nan))
        if not (math.isnan(value) and math.isnan(reported)) and abs(value - reported) > 1e-6:
            raise FlambyBenchmarkError(
                f"{out}: site {site} reported C-index {reported:.6f} but the final weights give {value:.6f}"
            )
    return result


# ------------------------------------------------------------------------------------------ tables
def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)), float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else math.nan


def summary_table(records: list[dict[str, Any]], ridge: dict[str, Any], centers: list[str]) -> pd.DataFrame:
    """One row per method: ours (mean ± sd over seeds) beside FLamby's, and per-center means."""
    frame = pd.DataFrame(records)
    rows = [
        {
            "method": f"pooled ridge Cox (alpha={ridge['alpha']:g}), reference",
            "seeds": 1,
            "mean over centers": ridge["mean_over_centers"],
            "sd over seeds": math.nan,
            "pooled test": ridge["pooled_test"],
            "FLamby mean": math.nan,
            "FLamby sd": math.nan,
            "FLamby pooled": math.nan,
            **{c: ridge["per_center"][c] for c in centers},
        }
    ]
    for label, group in frame.groupby("label", sort=False):
        mean, sd = _mean_sd(group["mean_over_centers"].tolist())
        pooled, _ = _mean_sd(group["pooled_test"].tolist())
        published = PUBLISHED.get(str(group["strategy"].iloc[0])) if pd.isna(group["extra"].iloc[0]) else None
        rows.append(
            {
                "method": label,
                "seeds": len(group),
                "mean over centers": mean,
                "sd over seeds": sd,
                "pooled test": pooled,
                "FLamby mean": published[0] if published else math.nan,
                "FLamby sd": published[1] if published else math.nan,
                "FLamby pooled": published[2] if published else math.nan,
                **{c: float(np.nanmean([r[c] for r in group["per_center"]])) for c in centers},
            }
        )
    return pd.DataFrame(rows)


def target_lines(table: pd.DataFrame, ridge: dict[str, Any]) -> list[str]:
    """Plain statements: does each federated row reach the ridge reference (within TOLERANCE, sd <= MAX)?"""
    lines = []
    for row in table.iloc[1:].to_dict("records"):
        gap_mean = row["mean over centers"] - ridge["mean_over_centers"]
        gap_pooled = row["pooled test"] - ridge["pooled_test"]
        sd = row["sd over seeds"]
        met = (
            gap_mean >= -TOLERANCE and gap_pooled >= -TOLERANCE and (math.isfinite(sd) and sd <= MAX_SEED_SD)
        )
        lines.append(
            f"- {row['method']}: {'MET' if met else 'NOT MET'} - mean over centers {gap_mean:+.3f} vs ridge, "
            f"pooled test {gap_pooled:+.3f} vs ridge (tolerance -{TOLERANCE}), seed sd {sd:.3f} "
            f"(max {MAX_SEED_SD})"
        )
    return lines


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--strategies", nargs="+", default=list(FLAMBY_STRATEGIES), choices=STRATEGY_OVERRIDES
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--extras",
        nargs="*",
        default=None,
        choices=sorted(EXTRAS),
        help="labelled extra rows (no value: all of them)",
    )
    parser.add_argument("--reference-only", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="only tabulate the runs on disk")
    parser.add_argument("--out", type=Path, default=OUT_ROOT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)

    fed = Federation.load()
    centers = [s.name for s in fed.sites]
    ridge = ridge_reference(fed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(ridge, args.out / "ridge_reference.json")
    print("\n## Pooled ridge Cox reference (sksurv CoxPHSurvivalAnalysis, standardized features)\n")
    print(
        f"alpha={ridge['alpha']:g}, {ridge['n_train']} training cases, {ridge['n_features']} features: "
        f"mean per-center test C-index {ridge['mean_over_centers']:.3f} (issue: "
        f"{ISSUE_REFERENCE['mean_over_centers']}), pooled test C-index {ridge['pooled_test']:.3f} (issue: "
        f"{ISSUE_REFERENCE['pooled_test']})\n"
    )
    print(markdown_table(pd.DataFrame([ridge["per_center"]])))
    if args.reference_only:
        return 0

    extras: list[str | None] = [None]
    if args.extras is not None:
        extras += args.extras or sorted(EXTRAS)
    records, failures = [], []
    for extra in extras:  # seeds outside strategies: an interrupted run still has every strategy
        for seed in args.seeds:
            for strategy in args.strategies:
                if extra is not None and strategy not in EXTRAS[extra][0]:
                    continue
                label = strategy if extra is None else f"{strategy} [extra: {extra}]"
                out = args.out / run_name(strategy, extra, seed)
                try:
                    if args.report_only and _completed(out) is None:
                        continue
                    run_federated(overrides_for(strategy, extra, seed), out)
                    result = score_run(fed, out)
                except (FlambyBenchmarkError, subprocess.TimeoutExpired) as error:
                    log.error("%s", error)
                    failures.append(str(error))
                    continue
                log.info(
                    "%s seed %d: mean over centers %.3f, pooled %.3f",
                    label,
                    seed,
                    result["mean_over_centers"],
                    result["pooled_test"],
                )
                records.append(
                    {
                        "label": label,
                        "strategy": strategy,
                        "extra": extra,
                        "seed": seed,
                        "mean_over_centers": result["mean_over_centers"],
                        "pooled_test": result["pooled_test"],
                        "per_center": result["per_center"],
                    }
                )
    write_json(records, args.out / "records.json")
    if not records:
        print("no completed federated run")
        return 1
    table = summary_table(records, ridge, centers)
    print("\n## Fed-TCGA-BRCA, FLamby protocol: C-index, ours (mean, sd over seeds) beside FLamby's\n")
    print(
        "Command per run: `fedprog simulate "
        + " ".join([*DATA, *PROTOCOL])
        + " <strategy overrides> [<extra overrides>] seed=<42..46>` (strategy overrides: "
        + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in STRATEGY_OVERRIDES.items())
        + "; extras: "
        + "; ".join(f"{k}: `{' '.join(v)}` ({'/'.join(s)})" for k, (s, v) in EXTRAS.items())
        + ").\n"
    )
    print(markdown_table(table))
    print("\n### Targets (federated within 0.01 of the pooled ridge Cox, seed sd <= 0.03)\n")
    print("\n".join(target_lines(table, ridge)))
    if failures:
        print("\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
