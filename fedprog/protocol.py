"""``fedprog train``: the cross-cancer protocol (train on source cohorts, evaluate on every unseen cohort).

For each source (one cohort, or a list of cohorts trained together) and each seed: split the source cases into
train and validation (stratified by event), fit the preprocessing on the training split only, train with the
shared engine (model selection on the source validation split, never on a target), then evaluate the frozen
model on the source validation split (in-domain) and on every target cohort (all cases). Results land in
``out/<run>/results.json`` (one record per source, target, backbone, modules, seed) and ``report.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedprog.data import Cohort, DatasetLayout, SurvivalDataset, load_cohorts
from fedprog.engine import (
    EvalResult,
    TrainConfig,
    TrainHistory,
    evaluate,
    resolve_device,
    seed_everything,
    train,
)
from fedprog.pipeline import PooledDataset, Preprocessing, build_model, fit_preprocessing, make_dataset
from fedprog.report import ReportBuilder, environment_info, plot_km
from fedprog.results import start_run, write_results
from fedprog.survival.metrics import harrell_cindex

log = logging.getLogger(__name__)

METRICS = ("c_index", "c_index_ipcw", "ibs", "mean_auc", "logrank_p", "n", "n_events")


def modules_label(model_cfg: Mapping[str, Any]) -> str:
    """``none``, ``SDIR``, ``CADE`` or ``SDIR+CADE`` from the model config's switches."""
    names = [name.upper() for name in ("sdir", "cade") if model_cfg.get(name, {}).get("enabled", False)]
    return "+".join(names) or "none"


def prepare_layout(data_cfg: DictConfig) -> DatasetLayout:
    """The dataset layout of ``data_cfg``, generating the synthetic default first when it is missing."""
    if data_cfg.get("generate_if_missing", False):
        from fedprog.data.synth import ensure_generated

        ensure_generated(data_cfg)
    return DatasetLayout.load(data_cfg)


def split_cases(cohort: Cohort, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split a cohort's cases into train and validation, stratified by event status (seeded)."""
    labels = cohort.labels
    rng = np.random.default_rng(seed)
    train_ids, val_ids = [], []
    for _, group in labels.groupby(labels["censorship"].astype(int)):
        ids = rng.permutation(group.index.to_numpy())
        n_val = int(round(val_fraction * len(ids)))
        val_ids.extend(ids[:n_val].tolist())
        train_ids.extend(ids[n_val:].tolist())
    return sorted(train_ids), sorted(val_ids)


def oracle_cindex(layout: DatasetLayout, cohort: str, result: EvalResult, column: str = "true_risk") -> float:
    """Harrell's C-index of the TRUE risk (or ``column``: ``shared_risk`` gives the transfer ceiling) on the
    evaluated cases (generated data only; NaN otherwise)."""
    if layout.truth is None or not layout.root_file(layout.truth).is_file():
        return math.nan
    truth = pd.read_csv(layout.root_file(layout.truth))
    truth = truth[truth["cohort"] == cohort].set_index("case_id")[column]
    return harrell_cindex(result.time, result.censorship, truth.loc[result.case_ids].to_numpy())


def _sources(cfg: DictConfig, cohorts: Sequence[str]) -> list[list[str]]:
    raw = OmegaConf.to_container(cfg.sources) if cfg.sources is not None else list(cohorts)
    sources = [[s] if isinstance(s, str) else list(s) for s in raw]  # type: ignore[union-attr]
    unknown = sorted({c for s in sources for c in s} - set(cohorts))
    if unknown:
        raise ValueError(f"sources name unknown cohort(s) {unknown}; the dataset has {list(cohorts)}")
    return sources


@dataclass
class SourceFit:
    """A seeded model trained on source cases, with the preprocessing fitted on those cases."""

    model: nn.Module
    prep: Preprocessing
    train_data: PooledDataset
    val_data: PooledDataset | None
    train_cfg: TrainConfig
    history: TrainHistory
    device: torch.device
    cohorts: Mapping[str, Cohort]
    max_patches: int | None
    seed: int

    def dataset(self, name: str, ids: Sequence[str]) -> SurvivalDataset:
        """Cases ``ids`` of cohort ``name`` with this fit's preprocessing."""
        return make_dataset(self.cohorts[name], ids, self.prep, max_patches=self.max_patches, seed=self.seed)

    def evaluate(self, data: SurvivalDataset) -> EvalResult:
        """The trained model on ``data`` (IPCW metrics censoring-weighted by the training cases)."""
        return evaluate(
            self.model,
            data,
            bins=self.prep.bins,
            device=self.device,
            loss_cfg=self.train_cfg,
            train_times=self.train_data.times,
            train_censorship=self.train_data.censorship,
        )


def fit_source(
    cfg: DictConfig,
    layout: DatasetLayout,
    cohorts: Mapping[str, Cohort],
    train_cases: Mapping[str, Sequence[str]],
    seed: int,
    *,
    label: str = "",
    val_cases: Mapping[str, Sequence[str]] | None = None,
    **training: Any,
) -> SourceFit:
    """Fit the preprocessing on ``train_cases`` (cohort -> case ids) and train a fresh model, seeded by
    ``seed`` alone, on them; the epoch is chosen on ``val_cases`` when any (``training`` overrides keys of
    ``cfg.training``)."""
    prep = fit_preprocessing(layout, cohorts, train_cases, n_bins=cfg.n_bins)
    train_cfg = TrainConfig.from_cfg(cfg.training, seed=seed, **training)
    device = resolve_device(cfg.training.device)
    parts = {"prep": prep, "max_patches": cfg.training.max_patches, "seed": seed}
    train_data = PooledDataset([make_dataset(cohorts[n], ids, **parts) for n, ids in train_cases.items()])
    val_parts = [make_dataset(cohorts[n], ids, **parts) for n, ids in (val_cases or {}).items() if ids]
    val_data = PooledDataset(val_parts) if val_parts else None  # val_fraction=0: every source case trains
    seed_everything(seed)  # the initial weights depend on the seed only, not on what ran before
    model = build_model(cfg.model, train_data, loss=train_cfg.loss)
    history = train(model, train_data, train_cfg, val_data=val_data, device=device, log_prefix=label)
    return SourceFit(
        model, prep, train_data, val_data, train_cfg, history, device, cohorts, cfg.training.max_patches, seed
    )


def run_source(
    cfg: DictConfig,
    layout: DatasetLayout,
    cohorts: Mapping[str, Cohort],
    source: Sequence[str],
    seed: int,
    *,
    km_dir: Path | None = None,
    targets: Sequence[str] | None = None,
    predictions: list[pd.DataFrame] | None = None,
) -> list[dict[str, Any]]:
    """Train on ``source`` with ``seed``; return one record per evaluated cohort (in-domain first).

    ``targets`` overrides ``cfg.targets``; with ``predictions``, each target's per-case risks are appended
    to it (:func:`prediction_frame`).
    """
    splits = {name: split_cases(cohorts[name], cfg.val_fraction, seed) for name in source}
    label = f"{'+'.join(source)} seed {seed}: "
    train_cases, val_cases = ({n: s[i] for n, s in splits.items()} for i in (0, 1))
    fit = fit_source(cfg, layout, cohorts, train_cases, seed, label=label, val_cases=val_cases)
    selected, seconds = fit.history.selected_epoch, fit.history.seconds
    in_domain = fit.evaluate(fit.val_data) if fit.val_data is not None else None  # the selected model
    if cfg.refit:  # check_split: the epoch was chosen on a validation split
        every_case = {n: sorted([*s[0], *s[1]]) for n, s in splits.items()}
        fit = fit_source(
            cfg, layout, cohorts, every_case, seed, label=label + "refit: ", epochs=selected, select_on="last"
        )
        seconds += fit.history.seconds

    base = {
        "source": "+".join(source),
        "backbone": cfg.model.name,
        "modules": modules_label(cfg.model),
        "seed": seed,
        "selected_epoch": selected,
        "refit": bool(cfg.refit),
        "train_seconds": round(seconds, 2),
    }
    evaluations = [("+".join(source), "in-domain (val)", in_domain, None)] if in_domain is not None else []
    if targets is None:
        targets = cfg.targets if cfg.targets is not None else [c for c in cohorts if c not in source]
    for target in targets:
        evaluations.append(
            (target, "target", fit.evaluate(fit.dataset(target, cohorts[target].case_ids)), target)
        )
    records = []
    for name, kind, result, cohort in evaluations:
        record = {**base, "target": name, "split": kind, **{k: result.metrics.get(k) for k in METRICS}}
        record["oracle_c_index"] = oracle_cindex(layout, cohort, result) if cohort else math.nan
        record["transfer_c_index"] = (
            oracle_cindex(layout, cohort, result, "shared_risk") if cohort else math.nan
        )
        records.append(record)
        log.info(
            "%s-> %s: c-index %.3f (oracle %.3f)", label, name, record["c_index"], record["oracle_c_index"]
        )
        if predictions is not None and kind == "target":
            predictions.append(prediction_frame(cohorts[name], seed, result))
        if km_dir is not None and kind == "target":
            path = km_dir / f"km_{base['source']}_to_{name}_{base['backbone']}_{base['modules']}.png"
            plot_km(result.time, result.censorship, result.risk, path, f"{base['source']} -> {name}")
    return records


def prediction_frame(cohort: Cohort, seed: int, result: EvalResult) -> pd.DataFrame:
    """Per-case risks of one target evaluation in the rotation's predictions format (sites from labels)."""
    from fedprog.compare import prediction_frame as frame

    sites = [f"{cohort.name}-{site}" for site in cohort.labels.loc[result.case_ids, "site"].astype(str)]
    return frame(cohort.name, seed, sites, result.case_ids, result.time, result.censorship, result.risk)


def effective_seeds(cfg: DictConfig) -> list[int]:
    """``rotation.seeds`` in a rotation that sets them, else the top-level ``seeds``."""
    if cfg.rotation.mode != "none" and cfg.rotation.seeds is not None:
        return [int(s) for s in cfg.rotation.seeds]
    return [int(s) for s in cfg.seeds]


def rotation_folds(cfg: DictConfig, cohorts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Leave-one-cancer-out folds: (target, sources = every other cohort) for each ``rotation.targets``."""
    targets = list(cfg.rotation.targets) if cfg.rotation.targets is not None else list(cohorts)
    unknown = sorted(set(targets) - set(cohorts))
    if unknown:
        raise ValueError(
            f"rotation.targets name unknown cohort(s) {unknown}; the dataset has {list(cohorts)}"
        )
    if len(cohorts) < 2:
        raise ValueError(f"rotation.mode=loco needs two or more cohorts, the dataset has {list(cohorts)}")
    return [(target, [c for c in cohorts if c != target]) for target in targets]


def run_rotation(cfg: DictConfig, out_dir: Path | None = None) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Leave-one-cancer-out over targets and seeds; return (records, predictions of every target case)."""
    layout = prepare_layout(cfg.data)
    cohorts = load_cohorts(layout)
    seeds = effective_seeds(cfg)
    records: list[dict[str, Any]] = []
    predictions: list[pd.DataFrame] = []
    folds = rotation_folds(cfg, list(cohorts))
    for i, (target, sources) in enumerate(folds, 1):
        for j, seed in enumerate(seeds):
            log.info(
                "rotation %d/%d: target %s, seed %d (%d/%d)", i, len(folds), target, seed, j + 1, len(seeds)
            )
            km_dir = out_dir if (out_dir is not None and cfg.km_plots and j == 0) else None
            records.extend(
                run_source(
                    cfg,
                    layout,
                    cohorts,
                    sources,
                    int(seed),
                    km_dir=km_dir,
                    targets=[target],
                    predictions=predictions,
                )
            )
    return records, pd.concat(predictions, ignore_index=True)


def run_protocol(cfg: DictConfig, out_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run every (source, seed) of the protocol; return the records (KM plots go to ``out_dir``)."""
    layout = prepare_layout(cfg.data)
    cohorts = load_cohorts(layout)
    records: list[dict[str, Any]] = []
    sources = _sources(cfg, list(cohorts))
    for i, source in enumerate(sources, 1):
        for j, seed in enumerate(cfg.seeds):
            log.info("source %d/%d %s, seed %d (%d/%d)", i, len(sources), source, seed, j + 1, len(cfg.seeds))
            km_dir = out_dir if (out_dir is not None and cfg.km_plots and j == 0) else None
            records.extend(run_source(cfg, layout, cohorts, source, int(seed), km_dir=km_dir))
    return records


def summarize(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (backbone, modules, source, target)."""
    frame = pd.DataFrame(records)
    keys = ["backbone", "modules", "source", "target", "split"]
    stats = frame.groupby(keys, sort=False).agg(
        c_index=("c_index", "mean"),
        c_index_sd=("c_index", "std"),
        c_index_ipcw=("c_index_ipcw", "mean"),
        ibs=("ibs", "mean"),
        oracle=("oracle_c_index", "mean"),
        transfer=("transfer_c_index", "mean"),
        seeds=("seed", "nunique"),
    )
    return stats.reset_index()


def write_outputs(
    cfg: DictConfig,
    out_dir: Path,
    records: Sequence[Mapping[str, Any]],
    *,
    rotation: pd.DataFrame | None = None,
) -> None:
    """results.json (records + summary + environment) and report.md with tables and KM plots."""
    summary = summarize(records)
    write_results(
        out_dir,
        "train",
        {"records": list(records), "summary": summary.to_dict("records"), "environment": environment_info()},
    )
    targets = summary[summary["split"] == "target"]
    report = ReportBuilder(out_dir, "fedprog cross-cancer protocol")
    report.section(
        "Protocol",
        f"Data `{cfg.data.get('name') or cfg.data.root}`, backbone `{cfg.model.name}`, "
        f"modules `{modules_label(cfg.model)}`, seeds {effective_seeds(cfg)}. {_split_sentence(cfg)} Targets "
        "are evaluated on all their cases with the source's preprocessing and bins. C-index: Harrell's; "
        "mean over seeds.",
    )
    if rotation is not None:
        columns = ["target", "c_index", "ci_low", "ci_high", "transfer_c_index", "oracle_c_index", "chance"]
        columns += ["n_seeds", "n_events", "few_events"]
        report.table(
            f"Leave-one-cancer-out (mean over seeds, {cfg.rotation.level:.0%} bootstrap CI)",
            rotation[columns],
        )
    report.table("Cross-cancer C-index (source -> target)", targets.drop(columns=["split"]))
    if rotation is None:
        pivot = targets.pivot_table(index="source", columns="target", values="c_index")
        report.table("C-index matrix (rows: source, columns: target)", pivot.reset_index())
    in_domain = summary[summary["split"] != "target"]
    if len(in_domain):
        report.table("In-domain validation", in_domain.drop(columns=["split"]))
    for png in sorted(out_dir.glob("km_*.png")):
        report.figure(png.stem.replace("_", " "), png)
    report.write()


def _split_sentence(cfg: DictConfig) -> str:
    """How the report describes the source split and the model selection."""
    if not cfg.val_fraction:
        return (
            f"Every source case trains (val_fraction=0); the model of the last of {cfg.training.epochs} "
            "epochs is kept (training.select_on=last)."
        )
    sentence = (
        f"Each source is split {1 - cfg.val_fraction:.0%}/{cfg.val_fraction:.0%} into train/validation "
        f"(model selection, training.select_on={cfg.training.select_on}, on the source validation split "
        "only)."
    )
    if cfg.refit:
        sentence += (
            " Then a model is trained again from the same initial weights on every source case for the "
            "chosen number of epochs (refit=true); the targets score that model, the in-domain row the "
            "selected one."
        )
    return sentence


def check_split(cfg: DictConfig) -> None:
    """``val_fraction`` in [0, 1), and 0 only with ``training.select_on=last``; ``refit`` only with an epoch
    chosen on a validation split (one-line ValueError)."""
    from fedprog.data.sites import checked_val_fraction

    if not checked_val_fraction(cfg.val_fraction, None, "val_fraction") and cfg.training.select_on != "last":
        raise ValueError(
            "val_fraction=0 leaves no source validation split for "
            f"training.select_on={cfg.training.select_on}; set training.select_on=last (keep the last epoch) "
            "or a val_fraction in (0, 1)"
        )
    if cfg.refit and (not cfg.val_fraction or cfg.training.select_on == "last"):
        raise ValueError(
            "refit=true trains again for the epoch chosen on the validation split, but "
            f"val_fraction={cfg.val_fraction} with training.select_on={cfg.training.select_on} chooses none; "
            "set val_fraction in (0, 1) and training.select_on=val_c_index (or val_loss), or refit=false"
        )
    if cfg.refit and cfg.training.local_steps:
        raise ValueError(
            f"refit=true counts epochs but training.local_steps={cfg.training.local_steps} fixes the steps; "
            "set training.local_steps=null or refit=false"
        )


def setting_label(cfg: DictConfig) -> str:
    """``cfg.label``, or ``<backbone>+<modules>`` (``pooled``: one centralized model on the sources)."""
    return str(cfg.label) if cfg.label else f"{cfg.model.name}+{modules_label(cfg.model)}"


def layout_truth(layout: DatasetLayout) -> pd.DataFrame | None:
    """The truth table of generated data (oracle and transfer ceilings), None for other data."""
    if layout.truth is None or not layout.root_file(layout.truth).is_file():
        return None
    from fedprog.data.synth import read_truth

    return read_truth(layout.root)


def write_rotation_outputs(
    cfg: DictConfig, out_dir: Path, records: Sequence[Mapping[str, Any]], predictions: pd.DataFrame
) -> pd.DataFrame:
    """rotation.json and predictions.csv.gz (fedprog.compare), plus the rotation table in report.md."""
    from fedprog.compare import write_rotation

    truth = layout_truth(prepare_layout(cfg.data))
    setting = {
        "label": setting_label(cfg),
        "command": "train",
        "strategy": "pooled",
        "model": cfg.model.name,
        "modules": modules_label(cfg.model),
        "rotation": cfg.rotation.mode,
        "targets": list(dict.fromkeys(predictions["target"])),
    }
    validation = [
        {"target": r["source"], "seed": r["seed"], "c_index": r["c_index"]}
        for r in records
        if r["split"] != "target"
    ]
    summary = write_rotation(
        out_dir,
        setting,
        predictions,
        truth=truth,
        n_boot=int(cfg.rotation.n_boot),
        level=float(cfg.rotation.level),
        extra={"source_validation": validation},
    )
    return summary


def main(cfg: DictConfig) -> int:
    """``fedprog train``: run the protocol and write results.json and report.md under ``out``."""
    select = cfg.rotation.get("select")
    if cfg.rotation.mode == "loco" and select and select.get("key") is not None:
        raise ValueError(
            f"rotation.select.key={select.key} is for `fedprog simulate rotation=loco`; `fedprog train` "
            "chooses its epoch on the sources' validation split (val_fraction, training.select_on)"
        )
    check_split(cfg)
    out_dir = start_run("train", cfg)  # out=null: a new runs/train/<time stamp>/ folder
    log.info("fedprog train -> %s", out_dir)
    if cfg.rotation.mode not in {"none", "loco"}:
        raise ValueError(f"rotation.mode={cfg.rotation.mode!r}; choose none or loco")
    if cfg.rotation.mode == "loco":
        records, predictions = run_rotation(cfg, out_dir)
        rotation = write_rotation_outputs(cfg, out_dir, records, predictions)
        write_outputs(cfg, out_dir, records, rotation=rotation)
        print(rotation.to_string(index=False, float_format="%.3f"))
        print(f"\nrotation: {out_dir / 'rotation.json'}\nreport:   {out_dir / 'report.md'}")
        return 0
    records = run_protocol(cfg, out_dir)
    write_outputs(cfg, out_dir, records)
    print(summarize(records).to_string(index=False))
    print(f"\nresults: {out_dir / 'results.json'}\nreport:  {out_dir / 'report.md'}")
    return 0
