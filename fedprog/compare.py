"""Rotation results shared by ``fedprog train`` and ``fedprog simulate``, and the comparison of settings.

A rotation (leave-one-cancer-out over targets, times seeds) writes into its run folder:

- ``predictions.csv.gz``: one row per (target, seed, site, case): ``target, seed, site, case_id, time,
  censorship, risk``. Patient-level: it stays where the run ran (the paired bootstrap needs it).
- ``rotation.json``: ``setting`` (label, command, model, modules, strategy, ...), ``folds`` (one row per
  target, seed and site, plus site ``all`` for the whole target: C-index, n, events), ``summary`` (per target
  and ``overall``: mean C-index over seeds, bootstrap CI, oracle and transfer ceilings, chance 0.5) and the
  bootstrap settings. Aggregates only.

:func:`write_rotation` builds both from a predictions table; :func:`compare` reads two or more run folders
and writes the paired table (markdown and JSON) and a forest plot: each setting's mean and CI per target
beside the ceilings and chance, and every setting's paired difference to the first (bootstrap CI, Wilcoxon p).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedprog.report import markdown_table, write_json
from fedprog.survival.stats import (
    OVERALL,
    PREDICTION_COLUMNS,
    bootstrap_summary,
    check_predictions,
    cindex,
    paired_comparison,
)

log = logging.getLogger(__name__)

ROTATION_FILE = "rotation.json"
PREDICTIONS_FILE = "predictions.csv.gz"
CHANCE = 0.5
FEW_EVENTS = 20  # a site or target with fewer events is flagged in the tables


class CompareError(ValueError):
    """A run folder without rotation results, or settings that cannot be compared."""


def prediction_frame(
    target: str,
    seed: int,
    site: str | Sequence[str],
    case_ids: Sequence[str],
    time: Any,
    censorship: Any,
    risk: Any,
) -> pd.DataFrame:
    """Per-case risks of one (target, seed) evaluation in the rotation's predictions format.

    ``site`` is one site name for every case, or one name per case; the columns are ``PREDICTION_COLUMNS``.
    """
    values = [target, seed, site, list(case_ids), time, censorship, risk]
    return pd.DataFrame(dict(zip(PREDICTION_COLUMNS, values, strict=True)), columns=list(PREDICTION_COLUMNS))


def fold_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """C-index, n and events per (target, seed, site), plus site ``all`` (the target's sites pooled)."""
    rows = []
    for (target, seed), group in predictions.groupby(["target", "seed"], sort=False):
        parts = [*group.groupby("site", sort=True), ("all", group)]
        for site, part in parts:
            time_, censorship = part["time"].to_numpy(float), part["censorship"].to_numpy(float)
            rows.append(
                {
                    "target": target,
                    "seed": int(seed),
                    "site": site,
                    "c_index": cindex(time_, censorship, part["risk"].to_numpy(float)),
                    "n": len(part),
                    "n_events": int((censorship == 0).sum()),
                }
            )
    return pd.DataFrame(rows)


def target_ceilings(truth: pd.DataFrame | None, predictions: pd.DataFrame) -> pd.DataFrame:
    """Oracle and transfer ceilings on each target's evaluated cases (NaN without a truth table)."""
    from fedprog.data.synth import truth_ceilings

    rows = []
    for target, group in predictions.groupby("target", sort=False):
        cases = group["case_id"].drop_duplicates().tolist()
        if truth is None:
            rows.append({"target": target, "oracle_c_index": math.nan, "transfer_c_index": math.nan})
            continue
        missing = [c for c in cases if c not in truth.index]
        if missing:
            raise CompareError(f"target {target}: case {missing[0]} is not in truth.csv")
        ceilings = truth_ceilings(truth, cases)
        rows.append({"target": target, **{k: ceilings[k] for k in ("oracle_c_index", "transfer_c_index")}})
    frame = pd.DataFrame(rows)
    overall = {"target": OVERALL, **frame[["oracle_c_index", "transfer_c_index"]].mean().to_dict()}
    return pd.concat([frame, pd.DataFrame([overall])], ignore_index=True)


def write_rotation(
    out_dir: str | Path,
    setting: Mapping[str, Any],
    predictions: pd.DataFrame,
    *,
    truth: pd.DataFrame | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Write ``predictions.csv.gz`` and ``rotation.json`` into ``out_dir``; return the summary table.

    Parameters
    ----------
    setting : mapping
        What was run: at least ``label``; also ``command``, ``model``, ``modules``, ``strategy``.
    predictions : DataFrame
        Columns :data:`fedprog.survival.stats.PREDICTION_COLUMNS`.
    truth : DataFrame, optional
        :func:`fedprog.data.synth.read_truth` of generated data: adds the oracle and transfer ceilings.
    extra : mapping, optional
        More JSON-able entries for ``rotation.json`` (e.g. source-validation scores per fold).
    """
    out = Path(out_dir)
    predictions = check_predictions(predictions.loc[:, list(PREDICTION_COLUMNS)].copy())
    predictions.to_csv(out / PREDICTIONS_FILE, index=False, float_format="%.6g")
    summary = bootstrap_summary(predictions, n_boot=n_boot, level=level, seed=seed)
    summary = summary.merge(target_ceilings(truth, predictions), on="target", how="left")
    summary["chance"] = CHANCE
    summary["few_events"] = summary["n_events"] < FEW_EVENTS
    folds = fold_table(predictions)
    record = {
        "setting": dict(setting),
        "bootstrap": {
            "n_boot": n_boot,
            "level": level,
            "seed": seed,
            "unit": "patients within sites, then seeds",
        },
        "folds": folds.to_dict("records"),
        "summary": summary.to_dict("records"),
        "predictions": PREDICTIONS_FILE,
        **dict(extra or {}),
    }
    write_json(record, out / ROTATION_FILE)
    return summary


def load_rotation(run_dir: str | Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """(rotation.json, predictions) of a run folder; :class:`CompareError` names what is missing."""
    run = Path(run_dir)
    for name in (ROTATION_FILE, PREDICTIONS_FILE):
        if not (run / name).is_file():
            raise CompareError(
                f"{run}: no {name}; run a rotation there first (e.g. `fedprog train rotation=loco`)"
            )
    record = json.loads((run / ROTATION_FILE).read_text())
    predictions = pd.read_csv(run / PREDICTIONS_FILE, dtype={"case_id": str, "site": str, "target": str})
    return record, check_predictions(predictions, str(run / PREDICTIONS_FILE))


def _only_seeds(predictions: pd.DataFrame, seeds: Sequence[int], run: Path) -> pd.DataFrame:
    """The rows of ``seeds``; :class:`CompareError` names the run and the seeds it lacks."""
    wanted = sorted({int(s) for s in seeds})
    if not wanted:
        raise CompareError("compare: seeds is empty; give at least one seed or null for all")
    present = {int(s) for s in predictions["seed"].unique()}
    missing = [s for s in wanted if s not in present]
    if missing:
        raise CompareError(f"{run}: no folds for seed(s) {missing} (it has {sorted(present)})")
    return predictions[predictions["seed"].astype(int).isin(wanted)].reset_index(drop=True)


def _check_same_seeds(frames: Sequence[pd.DataFrame], dirs: Sequence[Path]) -> list[int]:
    """The seeds all runs share; :class:`CompareError` names a run whose seeds differ, and the common ones."""
    seed_sets = [sorted({int(s) for s in frame["seed"].unique()}) for frame in frames]
    for seeds, run in zip(seed_sets[1:], dirs[1:], strict=True):
        if seeds != seed_sets[0]:
            common = sorted(set.intersection(*(set(s) for s in seed_sets)))
            raise CompareError(
                f"{run}: seeds {seeds} differ from {dirs[0]}'s {seed_sets[0]}; compare the common ones with "
                f"seeds=[{','.join(map(str, common))}]"
            )
    return seed_sets[0]


def _labels(records: Sequence[Mapping[str, Any]], dirs: Sequence[Path]) -> list[str]:
    labels = [str(r["setting"].get("label") or d.name) for r, d in zip(records, dirs, strict=True)]
    if len(set(labels)) < len(labels):  # same label twice: tell them apart by folder
        labels = [f"{label} ({d.name})" for label, d in zip(labels, dirs, strict=True)]
    return labels


def compare(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
) -> dict[str, pd.DataFrame]:
    """Compare rotation runs on their common folds; write ``comparison.{md,json}`` and ``forest.png``.

    ``seeds`` restricts every run to those rotation seeds (each run must hold all of them), e.g. to pair a
    two-seed ablation with the first two seeds of a five-seed baseline; ``None`` takes every seed, which must
    then be the same in all runs.

    Returns ``{"settings": per-setting summary, "paired": differences to the first setting}``.
    """
    if len(run_dirs) < 2:
        raise CompareError(f"compare needs two or more run folders, got {len(run_dirs)}")
    dirs = [Path(d) for d in run_dirs]
    loaded = [load_rotation(d) for d in dirs]
    if seeds is not None:
        loaded = [(r, _only_seeds(p, seeds, d)) for (r, p), d in zip(loaded, dirs, strict=True)]
    compared_seeds = _check_same_seeds([predictions for _, predictions in loaded], dirs)
    labels = _labels([r for r, _ in loaded], dirs)
    summaries, paired = [], []
    reference_label, reference = labels[0], loaded[0][1]
    for label, (record, predictions) in zip(labels, loaded, strict=True):
        summary = bootstrap_summary(predictions, n_boot=n_boot, level=level, seed=seed)
        ceilings = pd.DataFrame(record["summary"])[["target", "oracle_c_index", "transfer_c_index"]]
        summaries.append(summary.merge(ceilings, on="target", how="left").assign(setting=label))
        if label != reference_label:
            table = paired_comparison(predictions, reference, n_boot=n_boot, level=level, seed=seed)
            paired.append(table.assign(setting=label, reference=reference_label))
    summary_frame = pd.concat(summaries, ignore_index=True)
    differences = pd.concat(paired, ignore_index=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tables(out, summary_frame, differences, level, compared_seeds)
    forest_plot(summary_frame, differences, out / "forest.png")
    return {"settings": summary_frame, "paired": differences}


def _write_tables(
    out: Path, summary_frame: pd.DataFrame, differences: pd.DataFrame, level: float, seeds: Sequence[int]
) -> None:
    write_json(
        {
            "settings": summary_frame.to_dict("records"),
            "paired": differences.to_dict("records"),
            "level": level,
            "seeds": list(seeds),
        },
        out / "comparison.json",
    )
    columns = ["setting", "target", "c_index", "ci_low", "ci_high", "n_seeds", "n_events"]
    columns += ["transfer_c_index", "oracle_c_index"]
    pct = f"{level:.0%}"
    text = [
        "# Comparison of rotation runs\n",
        f"C-index: mean over seeds of Harrell's C on each held-out target; {pct} bootstrap CI resampling "
        "patients within sites, then seeds. Chance is 0.5; the transfer ceiling is the C-index of the true "
        "shared (transferable) risk, the oracle that of the true risk (generated data only). "
        f"Seeds compared: {', '.join(map(str, seeds))}.\n",
        "## Settings\n",
        markdown_table(summary_frame[columns]),
        f"\n## Paired differences to `{differences['reference'].iloc[0]}`\n",
        f"Same targets, seeds and patients; {pct} paired bootstrap CI; Wilcoxon signed-rank p over the "
        "(target, seed) differences (two-sided).\n",
        markdown_table(
            differences[["setting", "target", "difference", "ci_low", "ci_high", "wilcoxon_p", "n_pairs"]]
        ),
        "\n![forest plot](forest.png)\n",
    ]
    (out / "comparison.md").write_text("\n".join(text))


def forest_plot(summary_frame: pd.DataFrame, differences: pd.DataFrame, path: str | Path) -> Path:
    """Per target: each setting's C-index with CI, transfer ceiling, oracle and chance; paired differences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(summary_frame["target"]))
    labels = list(dict.fromkeys(summary_frame["setting"]))
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 0.6 * len(targets) * max(1, len(labels) / 2) + 1.5), sharey=True
    )
    step = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        rows = summary_frame[summary_frame["setting"] == label].set_index("target").loc[targets]
        y = np.arange(len(targets)) + j * step
        left.errorbar(
            rows["c_index"],
            y,
            xerr=[rows["c_index"] - rows["ci_low"], rows["ci_high"] - rows["c_index"]],
            fmt="o",
            capsize=3,
            label=label,
        )
        diff = differences[differences["setting"] == label]
        if not diff.empty:
            diff = diff.set_index("target").loc[targets]
            right.errorbar(
                diff["difference"],
                y,
                xerr=[diff["difference"] - diff["ci_low"], diff["ci_high"] - diff["difference"]],
                fmt="o",
                capsize=3,
                color=f"C{j}",
            )
    first = summary_frame[summary_frame["setting"] == labels[0]].set_index("target").loc[targets]
    y0 = np.arange(len(targets)) + 0.4 - step / 2
    left.scatter(first["transfer_c_index"], y0, marker="|", s=300, color="k", label="transfer ceiling")
    left.scatter(first["oracle_c_index"], y0, marker="|", s=300, color="grey", label="oracle")
    left.axvline(CHANCE, color="k", linestyle=":", label="chance")
    right.axvline(0.0, color="k", linestyle=":")
    left.set_yticks(np.arange(len(targets)) + 0.4 - step / 2, targets)
    left.invert_yaxis()
    left.set_xlabel("held-out C-index (bootstrap CI)")
    right.set_xlabel(f"difference to {labels[0]} (paired CI)")
    left.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def compare_main(cfg: Any) -> int:
    """``fedprog compare RUN1 RUN2 ...`` (``configs/compare.yaml``): print the tables, write the report."""
    runs = [str(run) for run in cfg.runs]
    argv = [*runs, "--n-boot", str(cfg.n_boot), "--level", str(cfg.level), "--seed", str(cfg.seed)]
    if cfg.get("seeds") is not None:
        argv += ["--seeds", *(str(int(s)) for s in cfg.seeds)]
    return main([*argv, "--out", str(cfg.out)] if cfg.out else argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``compare DIR1 DIR2 ... [--out DIR] [--n-boot N] [--seeds S ...]``: the paired table and forest."""
    import argparse

    parser = argparse.ArgumentParser(prog="fedprog compare", description="Compare rotation runs (paired).")
    parser.add_argument("runs", nargs="+", help="run folders holding rotation.json and predictions.csv.gz")
    parser.add_argument("--out", default=None, help="output folder (default: <first run>/compare)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only these rotation seeds")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "compare"
    try:
        tables = compare(
            args.runs, out, n_boot=args.n_boot, level=args.level, seed=args.seed, seeds=args.seeds
        )
    except CompareError as error:
        print(f"fedprog compare: {error}", file=sys.stderr)
        return 2
    columns = ["setting", "target", "c_index", "ci_low", "ci_high", "transfer_c_index"]
    print(tables["settings"][columns].to_string(index=False, float_format="%.3f"))
    print(tables["paired"].to_string(index=False, float_format="%.3f"))
    print(f"\ntable: {out / 'comparison.md'}\nplot:  {out / 'forest.png'}")
    return 0
