"""Reference: elastic-net Cox (sksurv Coxnet) on the expression genes, each source cancer -> the other ones.

The bar of issue #3 for the cross-cancer benchmark. For every source cohort and seed, the source cases are
split train/validation exactly as ``fedprog train`` does (:func:`fedprog.protocol.split_cases`); each gene is
clipped to +-``clip``, standardized with the moments of the source TRAINING cases and the z-scores clipped to
+-``z_clip`` (:class:`fedprog.data.ExpressionTransform`, method ``clip_standardize``); a Coxnet path
(``l1_ratio``) is fitted on the training cases and the penalty is chosen by Harrell's C-index on the SOURCE
validation split; the chosen model then scores every case of each other cohort. Nothing is fitted or chosen on
a target. ``--modality clinical`` runs the same procedure on the clinical covariates the four cohorts share
(age, sex, stage; the layout's tabular encoding) instead of the genes.

    python simulations/coxnet_reference.py                       # 4 sources x 3 seeds, data=tcga
    python simulations/coxnet_reference.py --refit                # then refit the chosen penalty on all cases
    python simulations/coxnet_reference.py --modality clinical    # age, sex, stage instead of the genes
    python simulations/coxnet_reference.py --seeds 0 1 2 3 4 --l1-ratio 0.5
    python simulations/coxnet_reference.py data=folder data.root=DIR sources=[brca] targets=[ext]

Like ``fedprog train``, it takes Hydra overrides of the ``train`` config: ``data=`` (default ``tcga`` with
``data.strong=clinical``), ``data.root=``, ``sources=`` (cohorts, default every cohort) and ``targets=``
(default every cohort outside the source). The genes are fixed by the SOURCE cohort (``gene_policy``) and a
target lacking some is imputed at the source mean (``max_missing_genes_fraction``, fedprog/data/harmonize.py),
so the result does not depend on which other cohorts sit in the data folder.

Writes ``runs/benchmarks/coxnet_reference.json`` (every record) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from fedprog.config import load_config
from fedprog.data import Cohort, DatasetLayout, ExpressionTransform, TabularTransform, load_cohorts
from fedprog.data.dataset import expression_frame
from fedprog.data.harmonize import align_expression, feature_genes, max_missing_fraction, missing_genes
from fedprog.data.transforms import tabular_transform_for
from fedprog.protocol import prepare_layout, split_cases
from fedprog.report import markdown_table, write_json
from fedprog.survival.metrics import harrell_cindex

log = logging.getLogger(__name__)

# Documented defaults (command-line options override them).
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_VAL_FRACTION = 0.2  # as configs/train.yaml
DEFAULT_L1_RATIO = 0.5  # elastic net, as the reference
DEFAULT_N_ALPHAS = 50  # penalties on the Coxnet path
DEFAULT_ALPHA_MIN_RATIO = (
    0.05  # smallest penalty / largest (p > n for most sources: keep the path regularized)
)
DEFAULT_CLIP = 10.0  # raw z-score clip (cBioPortal values reach |z| > 30,000)
DEFAULT_Z_CLIP = 5.0  # clip of the re-standardized values
DEFAULT_OUT = Path("runs/benchmarks")


def survival_array(cohort: Cohort, case_ids: list[str]) -> np.ndarray:
    """sksurv structured array (event, time) of ``case_ids``; event = 1 - censorship."""
    labels = cohort.labels.loc[case_ids]
    return Surv.from_arrays(
        event=labels["censorship"].to_numpy() == 0, time=labels["survival_months"].to_numpy()
    )


def fit_coxnet(
    x: np.ndarray, y: np.ndarray, args: argparse.Namespace, alphas: np.ndarray | None = None
) -> CoxnetSurvivalAnalysis:
    """Fit the Coxnet path on training features ``x`` (n_cases, n_genes) and outcomes ``y``.

    ``alphas`` (descending) fixes the penalties of the path (refit); by default sksurv chooses ``n_alphas``.
    """
    model = CoxnetSurvivalAnalysis(
        l1_ratio=args.l1_ratio,
        n_alphas=args.n_alphas,
        alphas=alphas,
        alpha_min_ratio=args.alpha_min_ratio,
        max_iter=100_000,
    )
    with warnings.catch_warnings():
        # the path may stop before its last penalties on p >> n data; the fitted penalties are still valid
        warnings.simplefilter("ignore", category=UserWarning)
        model.fit(x, y)
    return model


def select_alpha(
    model: CoxnetSurvivalAnalysis, x_val: np.ndarray, cohort: Cohort, val_ids: list[str]
) -> float:
    """The penalty of the fitted path with the best Harrell C-index on the source validation split."""
    labels = cohort.labels.loc[val_ids]
    best_alpha, best_score = math.nan, -math.inf
    for alpha in model.alphas_:
        risk = model.predict(x_val, alpha=alpha)
        if np.ptp(risk) == 0:  # the empty model (all coefficients 0) ranks nothing
            continue
        score = harrell_cindex(labels["survival_months"], labels["censorship"], risk)
        if score > best_score:
            best_alpha, best_score = float(alpha), score
    if math.isnan(best_alpha):
        raise RuntimeError(f"Coxnet on {cohort.name}: every penalty of the path gives a constant risk")
    return best_alpha


class Features:
    """Source-fitted features of any cohort: the source's genes (``expression``) or the clinical table.

    ``expression``: per-gene clip / standardize / clip (:class:`ExpressionTransform`, ``clip_standardize``) on
    the genes the source fixes; a cohort lacking some is imputed at the source mean (refused above
    ``max_missing_genes_fraction``). ``clinical``: the layout's :class:`TabularTransform` (age and sex
    standardized with missing indicators, stage one-hot). Both are fitted by :meth:`fit` on source cases only
    and applied unchanged elsewhere.
    """

    def __init__(self, cohorts: dict[str, Cohort], layout: DatasetLayout, args: argparse.Namespace) -> None:
        self.cohorts, self.layout, self.modality = cohorts, layout, args.modality
        self.genes: list[str] = []
        self.clip, self.z_clip = args.clip, args.z_clip
        self.transform: ExpressionTransform | TabularTransform | None = None

    def _table(self, name: str, ids: list[str]) -> pd.DataFrame:
        if self.modality == "clinical":
            return self.cohorts[name].tables[str(self.layout.strong)].loc[ids]
        missing_genes(name, self.cohorts[name].genes, self.genes, max_missing_fraction(self.layout))
        return align_expression(expression_frame(self.cohorts[name], None, ids), self.genes)

    def fit(self, source: str, ids: list[str]) -> Features:
        """Fit the transform on the ``ids`` cases of ``source``; returns self."""
        if self.modality == "clinical":
            self.transform = tabular_transform_for(self.layout)
        else:
            self.genes = feature_genes({source: self.cohorts[source].genes}, self.layout.gene_policy)
            self.transform = ExpressionTransform("clip_standardize", clip=self.clip, z_clip=self.z_clip)
        assert self.transform is not None
        self.transform.fit(self._table(source, ids))
        return self

    def __call__(self, name: str, ids: list[str]) -> np.ndarray:
        """float64 features, shape = (len(ids), n_features)."""
        assert self.transform is not None, "Features.fit first"
        table = self._table(name, ids)
        if isinstance(self.transform, ExpressionTransform):
            return self.transform.transform(table, impute_missing=True).astype(np.float64)
        return self.transform.transform(table).astype(np.float64)


def run_source(
    features: Features, source: str, seed: int, args: argparse.Namespace, targets: list[str] | None = None
) -> list[dict[str, Any]]:
    """Fit on ``source`` (one seed); one record for the source validation split, then one per target
    (``targets``, default every other cohort)."""
    cohorts = features.cohorts
    cohort = cohorts[source]
    train_ids, val_ids = split_cases(cohort, args.val_fraction, seed)
    features.fit(source, train_ids)
    started = time.perf_counter()
    model = fit_coxnet(features(source, train_ids), survival_array(cohort, train_ids), args)
    alpha = select_alpha(model, features(source, val_ids), cohort, val_ids)
    if args.refit:  # the chosen penalty, refitted on every source case (train + validation)
        path = model.alphas_[model.alphas_ >= alpha]
        all_ids = train_ids + val_ids
        features.fit(source, all_ids)
        model = fit_coxnet(features(source, all_ids), survival_array(cohort, all_ids), args, alphas=path)
    n_nonzero = int(np.count_nonzero(model.coef_[:, int(np.argmin(np.abs(model.alphas_ - alpha)))]))
    base = {"source": source, "seed": seed, "alpha": alpha, "n_nonzero": n_nonzero, "refit": args.refit}
    base["fit_seconds"] = round(time.perf_counter() - started, 2)
    evaluations = [(source, "in-domain (val)", val_ids)]
    names = targets if targets is not None else [name for name in cohorts if name != source]
    evaluations += [(name, "target", cohorts[name].case_ids) for name in names if name != source]
    records = []
    for name, split, ids in evaluations:
        labels = cohorts[name].labels.loc[ids]
        risk = model.predict(features(name, list(ids)), alpha=alpha)
        c_index = harrell_cindex(labels["survival_months"], labels["censorship"], risk)
        records.append({**base, "target": name, "split": split, "c_index": c_index, "n": len(ids)})
        log.info("%s seed %d -> %s (%s): c-index %.3f", source, seed, name, split, c_index)
    return records


def tables(frame: pd.DataFrame) -> str:
    """Markdown: per pair mean (sd over seeds), the 12-pair mean +- sd over seeds, in-domain validation."""
    targets = frame[frame["split"] == "target"]
    stats = targets.groupby(["source", "target"])["c_index"].agg(["mean", "std"]).reset_index()
    stats["C-index mean (sd)"] = stats.apply(lambda r: f"{r['mean']:.3f} ({r['std']:.3f})", axis=1)
    per_seed = targets.groupby("seed")["c_index"].mean()
    in_domain = frame[frame["split"] != "target"].groupby("source")["c_index"].agg(["mean", "std"])
    fitted = frame.groupby("source")[["alpha", "n_nonzero"]].mean()
    lines = [
        markdown_table(stats[["source", "target", "C-index mean (sd)"]]),
        "",
        f"**Mean over {len(stats)} pairs: {per_seed.mean():.3f} ± {per_seed.std():.3f}** "
        f"(sd over {len(per_seed)} seeds of the per-seed pair mean)",
        "",
        markdown_table(in_domain.join(fitted).rename(columns={"mean": "in-domain val C", "std": "sd"})),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", choices=("expression", "clinical"), default="expression")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    parser.add_argument("--l1-ratio", type=float, default=DEFAULT_L1_RATIO)
    parser.add_argument("--n-alphas", type=int, default=DEFAULT_N_ALPHAS)
    parser.add_argument("--alpha-min-ratio", type=float, default=DEFAULT_ALPHA_MIN_RATIO)
    parser.add_argument("--clip", type=float, default=DEFAULT_CLIP)
    parser.add_argument("--z-clip", type=float, default=DEFAULT_Z_CLIP)
    parser.add_argument(
        "--refit",
        action="store_true",
        help="refit the chosen penalty on all source cases (the in-domain score is then a training score)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the `train` config (e.g. data=tcga)")
    return parser.parse_args(argv)


def default_overrides(overrides: list[str]) -> list[str]:
    """``data=tcga data.strong=clinical`` unless the command line chooses its own ``data=``."""
    if any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
        return []
    return ["data=tcga", "data.strong=clinical"]


def sources_and_targets(cfg: Any, cohorts: list[str]) -> tuple[list[str], list[str] | None]:
    """``sources`` (single cohorts; default all) and ``targets`` (None: every cohort outside the source)."""
    raw = list(cfg.sources) if cfg.sources is not None else list(cohorts)
    if any(not isinstance(s, str) for s in raw):
        raise ValueError(f"coxnet_reference: sources must be single cohorts, got {raw}")
    targets = None if cfg.targets is None else [str(t) for t in cfg.targets]
    unknown = sorted((set(raw) | set(targets or ())) - set(cohorts))
    if unknown:
        raise ValueError(f"coxnet_reference: unknown cohort(s) {unknown}; the dataset has {cohorts}")
    return [str(s) for s in raw], targets


def main(argv: list[str]) -> int:
    """Entry point: fit every (source, seed), write the records and print the tables."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config("train", [*default_overrides(args.overrides), *args.overrides])
    layout = prepare_layout(cfg.data)
    sources, targets = sources_and_targets(cfg, list(layout.cohorts))
    used = list(dict.fromkeys([*sources, *(targets or layout.cohorts)]))
    features = Features(load_cohorts(layout, used), layout, args)
    what = "source genes" if args.modality == "expression" else "clinical covariates"
    log.info("Coxnet reference on the %s: sources %s, targets %s", what, sources, targets or "the others")
    records = []
    for source in sources:
        for seed in args.seeds:
            records.extend(run_source(features, source, seed, args, targets))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "features": what, "records": records},
        args.out / f"coxnet_reference_{args.modality}{'_refit' if args.refit else ''}.json",
    )
    print(
        f"\n## Coxnet reference (l1_ratio {args.l1_ratio}, {what}, refit {args.refit}): "
        "C-index mean (sd over seeds)\n"
    )
    print(tables(pd.DataFrame(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
