"""Reference: elastic-net Cox (sksurv Coxnet) on the expression genes, each source cancer -> the other ones.

The bar of issue #3 for the cross-cancer benchmark (and the linear-Cox baseline of issue #9). A source is one
cohort or a list of cohorts trained together (pooled), as in ``fedprog train``. For every source and seed, the
cases of each source cohort are split train/validation exactly as ``fedprog train`` does
(:func:`fedprog.protocol.split_cases` per cohort, same seed); the genes are fixed by the source cohorts
(``gene_policy``, as :mod:`fedprog.pipeline`); each gene is clipped to +-``clip``, standardized with the
moments of the pooled source TRAINING cases and the z-scores clipped to +-``z_clip``
(:class:`fedprog.data.ExpressionTransform`, method ``clip_standardize``); a Coxnet path (``l1_ratio``) is
fitted on the pooled training cases and the penalty is chosen by Harrell's C-index on the pooled SOURCE
validation split; the chosen model then scores every case of each target cohort. Nothing is fitted or chosen
on a target. ``--modality clinical`` runs the same procedure on the clinical covariates the cohorts share
(age, sex, stage; the layout's tabular encoding) instead of the genes, ``--modality both`` on the two side by
side (one elastic net over the clinical columns and the genes); ``--modality pathways`` scores each gene group
of the layout (TCGA: the 50 Hallmark sets) by the mean of its standardized genes, and ``clinical_pathways``
puts those scores beside the clinical columns.

    python simulations/coxnet_reference.py                       # 4 sources x 3 seeds, data=tcga
    python simulations/coxnet_reference.py --refit                # then refit the chosen penalty on all cases
    python simulations/coxnet_reference.py --modality clinical    # age, sex, stage instead of the genes
    python simulations/coxnet_reference.py --seeds 0 1 2 3 4 --l1-ratio 0.5
    python simulations/coxnet_reference.py data=folder data.root=DIR sources=[brca] targets=[ext]
    python simulations/coxnet_reference.py data=synth data.root=DIR sources=[[c0,c1,c2,c4,c5]] targets=[c3]
    python simulations/coxnet_reference.py --loco data=synth data.root=DIR   # every cohort held out in turn

``--loco`` (leave-one-cancer-out) holds out each cohort in turn (or each of ``targets=``) with every other
cohort as the pooled source, and prints per target the mean C-index over seeds with the hierarchical bootstrap
95% CI of :func:`fedprog.survival.stats.bootstrap_summary` (patients resampled within sites, then seeds); it
also writes ``<out>/coxnet_<modality>_loco/`` (rotation.json + predictions.csv.gz), so ``fedprog compare``
pairs the Coxnet with any ``fedprog train|simulate rotation=loco`` run on the same targets, seeds and cases.

Like ``fedprog train``, it takes Hydra overrides of the ``train`` config: ``data=`` (default ``tcga`` with
``data.strong=clinical``), ``data.root=``, ``sources=`` (cohorts or lists of cohorts, default every cohort)
and ``targets=`` (default every cohort outside the source). The genes are fixed by the SOURCE cohorts
(``gene_policy``) and a target lacking some is imputed at the source mean (``max_missing_genes_fraction``,
fedprog/data/harmonize.py), so the result does not depend on which other cohorts sit in the data folder.

Writes ``runs/benchmarks/coxnet_reference.json`` (every record) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.util import Surv

from fedprog.compare import prediction_frame as predictions_of
from fedprog.compare import write_rotation
from fedprog.config import load_config
from fedprog.data import Cohort, DatasetLayout, ExpressionTransform, TabularTransform, load_cohorts
from fedprog.data.dataset import expression_frame
from fedprog.data.groups import group_means, load_groups
from fedprog.data.harmonize import align_expression, feature_genes, max_missing_fraction, missing_genes
from fedprog.data.transforms import tabular_transform_for
from fedprog.protocol import layout_truth, prepare_layout, split_cases
from fedprog.report import markdown_table, write_json
from fedprog.survival.metrics import harrell_cindex
from fedprog.survival.stats import bootstrap_summary

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
DEFAULT_N_BOOT = 1000  # bootstrap replicates of the --loco CI
DEFAULT_OUT = Path("runs/benchmarks")
#: What each feature block is (``--modality`` puts one or two side by side).
BLOCK_NAMES = {"clinical": "clinical covariates", "expression": "source genes", "pathways": "pathway scores"}
#: Feature blocks of each ``--modality``, in column order.
BLOCKS = {
    "expression": ("expression",),
    "clinical": ("clinical",),
    "both": ("clinical", "expression"),
    "pathways": ("pathways",),
    "clinical_pathways": ("clinical", "pathways"),
}


def described(modality: str) -> str:
    """The features of ``--modality`` in words (e.g. "clinical covariates + pathway scores")."""
    return " + ".join(BLOCK_NAMES[block] for block in BLOCKS[modality])


Parts = Mapping[str, Sequence[str]]  # cohort name -> case ids, in the source's cohort order


def pooled_labels(cohorts: Mapping[str, Cohort], parts: Parts) -> pd.DataFrame:
    """The labels of the ``parts`` cases, stacked in the order of ``parts`` (the feature rows' order)."""
    return pd.concat([cohorts[name].labels.loc[list(ids)] for name, ids in parts.items()])


def survival_array(labels: pd.DataFrame) -> np.ndarray:
    """sksurv structured array (event, time) of the ``labels`` rows; event = 1 - censorship."""
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
    model: CoxnetSurvivalAnalysis, x_val: np.ndarray, labels: pd.DataFrame, source: str
) -> float:
    """The penalty of the fitted path with the best Harrell C-index on the (pooled) source validation split
    (``x_val`` rows = ``labels`` rows); ``source`` names the source in the error."""
    best_alpha, best_score = math.nan, -math.inf
    for alpha in model.alphas_:
        risk = model.predict(x_val, alpha=alpha)
        if np.ptp(risk) == 0:  # the empty model (all coefficients 0) ranks nothing
            continue
        score = harrell_cindex(labels["survival_months"], labels["censorship"], risk)
        if score > best_score:
            best_alpha, best_score = float(alpha), score
    if math.isnan(best_alpha):
        raise RuntimeError(f"Coxnet on {source}: every penalty of the path gives a constant risk")
    return best_alpha


class Features:
    """Source-fitted features of any cohort: the blocks of ``--modality`` side by side (:data:`BLOCKS`): the
    clinical table, the source's genes, or one score per gene group (the mean of its standardized genes).

    Expression: per-gene clip / standardize / clip (:class:`ExpressionTransform`, ``clip_standardize``) on the
    genes the source fixes; a cohort lacking some is imputed at the source mean (refused above
    ``max_missing_genes_fraction``). Clinical: the layout's :class:`TabularTransform` (age and sex
    standardized with missing indicators, stage one-hot). Both are fitted by :meth:`fit` on source cases only
    and applied unchanged elsewhere.
    """

    def __init__(self, cohorts: dict[str, Cohort], layout: DatasetLayout, args: argparse.Namespace) -> None:
        self.cohorts, self.layout, self.modality = cohorts, layout, args.modality
        self.genes: list[str] = []
        self.clip, self.z_clip = args.clip, args.z_clip
        self.expression: ExpressionTransform | None = None
        self.clinical: TabularTransform | None = None
        self.pathway_means: np.ndarray | None = None  # [groups, genes] averaging matrix (pathways)

    @property
    def parts(self) -> tuple[str, ...]:
        """The feature blocks of ``modality``, in column order."""
        return BLOCKS[self.modality]

    def _clinical_table(self, name: str, ids: list[str]) -> pd.DataFrame:
        return self.cohorts[name].tables[str(self.layout.strong)].loc[ids]

    def _expression_table(self, name: str, ids: list[str]) -> pd.DataFrame:
        missing_genes(name, self.cohorts[name].genes, self.genes, max_missing_fraction(self.layout))
        return align_expression(expression_frame(self.cohorts[name], None, ids), self.genes)

    def fit(self, parts: Parts) -> Features:
        """Fit the transforms on the pooled ``parts`` (source cohort -> its training case ids); returns self.

        The genes are fixed by the source cohorts' gene lists (``gene_policy``); a gene a source cohort lacks
        (``union``) counts no case of it in the moments (:meth:`ExpressionTransform.fit_parts`).
        """
        if "pathways" in self.parts and self.layout.groups is None:
            raise ValueError(f"coxnet_reference: data {self.layout.name!r} defines no gene groups")
        if "clinical" in self.parts:
            transform = tabular_transform_for(self.layout)
            if transform is None:
                raise ValueError(f"coxnet_reference: data {self.layout.name!r} has no clinical table")
            tables = [self._clinical_table(n, list(ids)) for n, ids in parts.items()]
            self.clinical = transform.fit(pd.concat(tables))
        if "expression" in self.parts or "pathways" in self.parts:
            self.genes = feature_genes({n: self.cohorts[n].genes for n in parts}, self.layout.gene_policy)
            expression = ExpressionTransform("clip_standardize", clip=self.clip, z_clip=self.z_clip)
            tables = [self._expression_table(n, list(ids)) for n, ids in parts.items()]
            self.expression = expression.fit_parts(tables)
        if "pathways" in self.parts:
            groups = load_groups(self.layout).restrict(self.genes).indices(self.genes)
            self.pathway_means = group_means(groups, len(self.genes))
        return self

    def __call__(self, name: str, ids: Sequence[str]) -> np.ndarray:
        """float64 features of cohort ``name``, shape = (len(ids), n_features)."""
        blocks = []
        if "clinical" in self.parts:
            assert self.clinical is not None, "Features.fit first"
            blocks.append(self.clinical.transform(self._clinical_table(name, list(ids))))
        if "expression" in self.parts or "pathways" in self.parts:
            assert self.expression is not None, "Features.fit first"
            genes = self.expression.transform(self._expression_table(name, list(ids)), impute_missing=True)
            if "expression" in self.parts:
                blocks.append(genes)
            else:
                assert self.pathway_means is not None, "Features.fit first"
                blocks.append(genes.astype(np.float64) @ self.pathway_means.T)
        return np.hstack(blocks).astype(np.float64)

    def pooled(self, parts: Parts) -> np.ndarray:
        """Features of the ``parts`` cases stacked in the order of ``parts`` (as :func:`pooled_labels`)."""
        return np.vstack([self(name, ids) for name, ids in parts.items()])


def fit_source(
    features: Features, source: Sequence[str], seed: int, args: argparse.Namespace
) -> tuple[CoxnetSurvivalAnalysis, float, dict[str, list[str]]]:
    """Split every source cohort (``split_cases``, ``seed``), fit the features and the Coxnet path on the
    pooled training cases and choose the penalty on the pooled validation cases.

    Returns (model, alpha, validation case ids per source cohort).
    """
    cohorts, name = features.cohorts, "+".join(source)
    splits = {c: split_cases(cohorts[c], args.val_fraction, seed) for c in source}
    train = {c: split[0] for c, split in splits.items()}
    val = {c: split[1] for c, split in splits.items() if split[1]}
    features.fit(train)
    model = fit_coxnet(features.pooled(train), survival_array(pooled_labels(cohorts, train)), args)
    alpha = select_alpha(model, features.pooled(val), pooled_labels(cohorts, val), name)
    if args.refit:  # the chosen penalty, refitted on every source case (train + validation)
        path = model.alphas_[model.alphas_ >= alpha]
        every = {c: train[c] + val.get(c, []) for c in source}
        features.fit(every)
        labels = pooled_labels(cohorts, every)
        model = fit_coxnet(features.pooled(every), survival_array(labels), args, alphas=path)
    return model, alpha, val


def run_source(
    features: Features,
    source: Sequence[str],
    seed: int,
    args: argparse.Namespace,
    targets: list[str] | None = None,
    predictions: list[pd.DataFrame] | None = None,
) -> list[dict[str, Any]]:
    """Fit on ``source`` (one cohort or several pooled; one seed); one record for the pooled source validation
    split, then one per target (``targets``, default every cohort outside the source). With ``predictions``,
    each target's per-case risks are appended to it (the :mod:`fedprog.survival.stats` format)."""
    cohorts, name = features.cohorts, "+".join(source)
    started = time.perf_counter()
    model, alpha, val = fit_source(features, source, seed, args)
    n_nonzero = int(np.count_nonzero(model.coef_[:, int(np.argmin(np.abs(model.alphas_ - alpha)))]))
    base = {"source": name, "seed": seed, "alpha": alpha, "n_nonzero": n_nonzero, "refit": args.refit}
    base["fit_seconds"] = round(time.perf_counter() - started, 2)
    labels = pooled_labels(cohorts, val)
    evaluations = [(name, "in-domain (val)", labels, model.predict(features.pooled(val), alpha=alpha))]
    names = targets if targets is not None else [c for c in cohorts if c not in source]
    for target in [t for t in names if t not in source]:
        ids = list(cohorts[target].case_ids)
        risk = model.predict(features(target, ids), alpha=alpha)
        evaluations.append((target, "target", cohorts[target].labels.loc[ids], risk))
        if predictions is not None:
            predictions.append(prediction_frame(cohorts[target], seed, ids, risk))
    records = []
    for target, split, rows, risk in evaluations:
        c_index = harrell_cindex(rows["survival_months"], rows["censorship"], risk)
        records.append({**base, "target": target, "split": split, "c_index": c_index, "n": len(rows)})
        log.info("%s seed %d -> %s (%s): c-index %.3f", name, seed, target, split, c_index)
    return records


def prediction_frame(cohort: Cohort, seed: int, ids: list[str], risk: np.ndarray) -> pd.DataFrame:
    """Per-case risks of one target, in the predictions format of :mod:`fedprog.survival.stats`."""
    labels = cohort.labels.loc[ids]
    sites = [f"{cohort.name}-{site}" for site in labels["site"].astype(str)]
    time, censorship = labels["survival_months"].to_numpy(), labels["censorship"].to_numpy()
    return predictions_of(cohort.name, seed, sites, ids, time, censorship, risk)


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
    parser.add_argument("--modality", choices=BLOCKS, default="expression")
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
    parser.add_argument(
        "--loco",
        action="store_true",
        help="leave-one-cancer-out: each cohort (or each of targets=) held out, all others the pooled source",
    )
    parser.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT, help="bootstrap replicates (--loco CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the `train` config (e.g. data=tcga)")
    return parser.parse_args(argv)


def default_overrides(overrides: list[str]) -> list[str]:
    """``data=tcga data.strong=clinical`` unless the command line chooses its own ``data=``."""
    if any(o.split("=", 1)[0].lstrip("+~") == "data" for o in overrides):
        return []
    return ["data=tcga", "data.strong=clinical"]


def sources_and_targets(cfg: Any, cohorts: list[str]) -> tuple[list[list[str]], list[str] | None]:
    """``sources`` (each a cohort or a list of cohorts pooled; default each cohort alone) and ``targets``
    (None: every cohort outside the source)."""
    raw = OmegaConf.to_container(cfg.sources) if cfg.sources is not None else list(cohorts)
    sources = [[str(s)] if isinstance(s, str) else [str(c) for c in s] for s in raw]  # type: ignore[union-attr]
    if any(not source for source in sources):
        raise ValueError(f"coxnet_reference: sources has an empty list: {raw}")
    targets = None if cfg.targets is None else [str(t) for t in cfg.targets]
    unknown = sorted(({c for s in sources for c in s} | set(targets or ())) - set(cohorts))
    if unknown:
        raise ValueError(f"coxnet_reference: unknown cohort(s) {unknown}; the dataset has {cohorts}")
    return sources, targets


def loco_folds(cfg: Any, cohorts: list[str]) -> list[tuple[str, list[str]]]:
    """Leave-one-cancer-out: (target, every other cohort as the pooled source) for each of ``targets=``
    (default every cohort); ``sources=`` is refused (the other cohorts are the source)."""
    if cfg.sources is not None:
        raise ValueError("coxnet_reference --loco: the source is every other cohort; drop sources=")
    _, targets = sources_and_targets(cfg, cohorts)
    if len(cohorts) < 2:
        raise ValueError(f"coxnet_reference --loco needs two or more cohorts, the dataset has {cohorts}")
    return [(t, [c for c in cohorts if c != t]) for t in (targets if targets is not None else cohorts)]


def ceilings(layout: DatasetLayout, cohort: Cohort) -> tuple[float, float]:
    """(oracle, transfer ceiling): Harrell's C-index of ``truth``'s true and shared risk on every case of
    ``cohort`` (generated data; NaN without a truth file)."""
    if layout.truth is None or not layout.root_file(layout.truth).is_file():
        return math.nan, math.nan
    truth = pd.read_csv(layout.root_file(layout.truth))
    truth = truth[truth["cohort"] == cohort.name].set_index("case_id")
    labels = cohort.labels.loc[list(cohort.case_ids)]
    return tuple(  # type: ignore[return-value]
        harrell_cindex(labels["survival_months"], labels["censorship"], truth.loc[labels.index, column])
        for column in ("true_risk", "shared_risk")
    )


def _cell(value: float) -> str:
    """Three decimals; blank for NaN (no value for that row)."""
    return "" if math.isnan(value) else f"{value:.3f}"


def loco_table(
    frame: pd.DataFrame,
    predictions: pd.DataFrame,
    layout: DatasetLayout,
    cohorts: Mapping[str, Cohort],
    n_boot: int,
) -> str:
    """Markdown: per held-out target the mean C-index over seeds with its bootstrap 95% CI (and overall),
    the ceilings on generated data, and the pooled-source validation C-index and genes kept."""
    summary = bootstrap_summary(predictions, n_boot=n_boot, seed=0).set_index("target")
    held_out = frame[frame["split"] == "target"].set_index(["source", "seed"])["target"]
    val = frame[frame["split"] != "target"].set_index(["source", "seed"]).assign(held_out=held_out)
    val = val.groupby("held_out")[["c_index", "n_nonzero"]].mean()
    rows = []
    for target, row in summary.iterrows():
        oracle, transfer = ceilings(layout, cohorts[target]) if target in cohorts else (math.nan, math.nan)
        rows.append(
            {
                "held-out": target,
                "C-index (mean over seeds)": f"{row['c_index']:.3f}",
                "95% CI": f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]",
                "sd seeds": _cell(row["sd_seeds"]),
                "n / events": f"{int(row['n'])} / {int(row['n_events'])}",
                "oracle": _cell(oracle),
                "transfer": _cell(transfer),
                "source val C": f"{val.loc[target, 'c_index']:.3f}" if target in val.index else "",
                "genes kept": f"{val.loc[target, 'n_nonzero']:.0f}" if target in val.index else "",
            }
        )
    seeds = int(summary["n_seeds"].min())
    note = f"Bootstrap {n_boot} replicates: patients within sites, then {seeds} seeds (survival/stats.py)"
    return markdown_table(pd.DataFrame(rows)) + "\n\n" + note


def run_all(
    args: argparse.Namespace, cfg: Any, layout: DatasetLayout
) -> tuple[list[dict[str, Any]], pd.DataFrame | None, dict[str, Cohort]]:
    """Every (source, seed) of the command line, or every leave-one-cancer-out fold with ``--loco``.

    Returns (records, the targets' per-case predictions with ``--loco`` else None, the loaded cohorts).
    """
    cohort_names = list(layout.cohorts)
    if args.loco:
        plan = [(sources, [target]) for target, sources in loco_folds(cfg, cohort_names)]
        used = cohort_names
    else:
        sources, targets = sources_and_targets(cfg, cohort_names)
        plan = [(source, targets) for source in sources]
        used = list(dict.fromkeys([*(c for s in sources for c in s), *(targets or cohort_names)]))
    features = Features(load_cohorts(layout, used), layout, args)
    what = described(args.modality)
    log.info("Coxnet reference on the %s: %s", what, [("+".join(s), t or "the others") for s, t in plan])
    records: list[dict[str, Any]] = []
    predictions: list[pd.DataFrame] = []
    for source, targets in plan:
        for seed in args.seeds:
            records.extend(run_source(features, source, seed, args, targets, predictions))
    frame = pd.concat(predictions, ignore_index=True) if args.loco else None
    return records, frame, features.cohorts


def rotation_setting(args: argparse.Namespace, argv: list[str]) -> dict[str, str]:
    """The ``setting`` of the rotation.json that ``--loco`` writes (what ``fedprog compare`` shows)."""
    return {
        "label": f"coxnet_{args.modality}",
        "command": " ".join(["python simulations/coxnet_reference.py", *argv]),
        "model": f"coxnet (l1_ratio {args.l1_ratio}) on the {described(args.modality)}",
        "modules": "none",
        "strategy": "pooled sources",
    }


def main(argv: list[str]) -> int:
    """Entry point: fit every (source, seed), write the records and print the tables."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config("train", [*default_overrides(args.overrides), *args.overrides])
    layout = prepare_layout(cfg.data)
    records, predictions, cohorts = run_all(args, cfg, layout)
    what = described(args.modality)
    settings = {k: str(v) for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"{'_refit' if args.refit else ''}{'_loco' if args.loco else ''}"
    write_json(
        {"settings": settings, "features": what, "records": records},
        args.out / f"coxnet_reference_{args.modality}{suffix}.json",
    )
    title = f"## Coxnet reference (l1_ratio {args.l1_ratio}, {what}, refit {args.refit})"
    if predictions is not None:
        rotation = args.out / f"coxnet_{args.modality}{suffix}"
        rotation.mkdir(parents=True, exist_ok=True)
        write_rotation(
            rotation,
            rotation_setting(args, argv),
            predictions,
            truth=layout_truth(layout),
            n_boot=args.n_boot,
        )
        log.info("rotation results for `fedprog compare`: %s", rotation)
        print(f"\n{title}, leave-one-cancer-out: held-out C-index, mean over seeds [bootstrap 95% CI]\n")
        print(loco_table(pd.DataFrame(records), predictions, layout, cohorts, args.n_boot))
    else:
        print(f"\n{title}: C-index mean (sd over seeds)\n")
        print(tables(pd.DataFrame(records)))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except ValueError as error:  # a one-line reason instead of a traceback
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
