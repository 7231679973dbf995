"""Benchmark (issue #4): held-out C-index of federated strategies vs local-only and pooled training.

Runs ``fedprog simulate`` over a grid of (strategy, modules, seed) and prints, per setting, the held-out
C-index (event-weighted over the held-out sites, final round) and the training-site summary (event-weighted
over the training sites, evaluated on all their cases: in-sample), as mean ± sd over seeds (sample sd).

Parts:

- ``synth``: the generated default federation (12 sites: 6 cancers x 2 hospitals, both c3 hospitals held
  out) with the defaults of configs/simulate.yaml; FedAvg, FedProx, FedAdam, local-only and pooled, with and
  without SDIR+CADE (``modules=sdir_cade``). The table adds the held-out sites' transfer ceiling (generated
  truth) and paired differences to the reference setting (``--reference``) over the same seeds.
- ``tcga``: real TCGA expression, tissue-source-site hospitals, STAD held out
  (``data=tcga federation=tcga_tss heldout=[stad]``); ``--tcga-strong clinical`` uses the multimodal default
  backbone with the clinical table as the strong modality, ``--tcga-strong null`` runs expression only with
  ``model=snn`` (SDIR/CADE need two modalities, so only ``modules=none`` there).

``GRID`` below pins the settings of each part (tcga: fewer rounds and local epochs than
configs/simulate.yaml, for a 2-core machine); the baselines get the same total epoch budget,
``rounds * training.epochs``.
Each Flower run is a separate ``fedprog simulate`` process, run one after the other; baselines run in this
process (no Flower). Raw outputs go to ``runs/benchmarks/federated/<part>/<run>/`` (git-ignored); a run whose
``results.json`` says ``completed`` is not run again, so the script is resumable.

    python simulations/federated.py synth                  # 5 strategies x 2 module settings x 3 seeds
    python simulations/federated.py tcga --tcga-strong null --strategies fedavg fedadam pooled
    python simulations/federated.py synth --report-only    # tables from what is on disk
    python simulations/federated.py synth --targets c0 c1 c2 c4 c5 --strategies fedavg pooled --modules none \
        --seeds 0 1    # every listed cancer held out in turn (out/<target>/...), then one table over targets
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from fedprog.report import markdown_table, write_json

log = logging.getLogger("simulations.federated")

OUT_ROOT = Path("runs/benchmarks/federated")
SEEDS = (0, 1, 2)
STRATEGIES = ("fedavg", "fedprox", "fedadam", "local", "pooled")
BASELINES = ("local", "pooled")
PRIORITY = ("fedavg", "pooled", "local", "fedadam", "fedprox")  # run order of the grid
MODULES = ("none", "sdir_cade")
#: Settings of each part: synth runs the defaults; tcga a reduced budget (dim 64, 4 patients/step, lr 1e-3).
GRID = {
    "synth": [],  # the defaults of configs/simulate.yaml (what `fedprog simulate` runs)
    "tcga": ["rounds=5", "training.epochs=1", "model.dim=64", "training.grad_accum=4", "training.lr=1e-3"],
}
PART_OVERRIDES = {
    "synth": [],
    "tcga": ["data=tcga", "federation=tcga_tss", "heldout=[stad]"],
}
TCGA_STRONG = {
    "clinical": ["data.strong=clinical"],
    "null": ["model=snn", "data.strong=null"],
}
RUN_TIMEOUT_S = 3600
#: Cells left out of the default grid to fit the compute budget (``--all`` runs them): SDIR+CADE is compared
#: on FedAvg and the two baselines; FedProx and FedAdam run without modules.
REDUCED = {("fedprox", "sdir_cade"), ("fedadam", "sdir_cade")}


class BenchmarkError(RuntimeError):
    """A simulation of the grid failed; the message names the run and its log file."""


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: a strategy with a module setting and a seed, and its exact overrides."""

    part: str
    strategy: str
    modules: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        """Folder name of the run."""
        return f"{self.strategy}_{self.modules}_s{self.seed}"

    def out(self, root: Path) -> Path:
        """Output folder of the run."""
        return root / self.part / self.name

    def command(self, root: Path) -> list[str]:
        """The exact ``fedprog simulate`` command line."""
        return ["fedprog", "simulate", *self.overrides, f"out={self.out(root)}"]


def grid(
    part: str,
    strategies: Sequence[str],
    modules: Sequence[str],
    seeds: Sequence[int],
    extra: list[str],
    tcga_strong: str,
    *,
    full: bool = False,
) -> list[RunSpec]:
    """Every run of ``part``, in ``PRIORITY`` order so that an interrupted grid has its key cells complete."""
    common = [*PART_OVERRIDES[part], *GRID[part]]
    if part == "tcga":
        common += TCGA_STRONG[tcga_strong]
        if tcga_strong == "null":
            modules = [m for m in modules if m == "none"]
    specs = []
    for strategy in strategies:
        for module in modules:
            if not full and (strategy, module) in REDUCED:
                continue
            for seed in seeds:
                overrides = (*common, f"strategy={strategy}", f"modules={module}", f"seed={seed}", *extra)
                specs.append(RunSpec(part, strategy, module, seed, overrides))
    return sorted(specs, key=lambda s: (PRIORITY.index(s.strategy), MODULES.index(s.modules), s.seed))


def _same(text: str, value: Any) -> bool:
    """Whether the override text ``text`` sets ``value`` (numbers compared as floats: 5e-4 == 0.0005)."""
    try:
        return float(text) == float(value)
    except (TypeError, ValueError):
        return str(yaml.safe_load(text)) == str(value)


def _completed(out: Path, overrides: Sequence[str] = ()) -> dict[str, Any] | None:
    """The run's results when it completed with the values ``overrides`` set (dotted keys), else None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    if results.get("status") != "completed":
        return None
    config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").is_file() else {}
    for override in overrides:
        key, _, value = override.partition("=")
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict | list) or node is None:
            continue  # a config group (strategy=, modules=, data=) or a key absent from the saved config
        if not _same(value, node):
            log.warning("%s: %s=%s in its config, %s wanted: run again", out, key, node, value)
            return None
    return results


def run_one(spec: RunSpec, root: Path) -> dict[str, Any]:
    """Run one cell (skipped when its completed results are on disk); returns its results.json content."""
    out = spec.out(root)
    done = _completed(out, spec.overrides)
    if done is not None:
        log.info("%s/%s: already done, skipped", spec.part, spec.name)
        return done
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if spec.strategy in BASELINES:
        # no Flower: run the baseline in this process (saves the start-up of a fresh interpreter)
        from fedprog.config import load_config
        from fedprog.federated.simulation import main as simulate

        code = simulate(load_config("simulate", [*spec.overrides, f"out={out}"]))
    else:
        command = [str(Path(sys.executable).with_name("fedprog")), *spec.command(root)[1:]]
        with open(out / "simulate.log", "w") as stream:
            code = subprocess.run(
                command, stdout=stream, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=False
            ).returncode
    wall = time.perf_counter() - started
    done = _completed(out)
    if code != 0 or done is None:
        raise BenchmarkError(f"{spec.part}/{spec.name} failed (exit {code}); see {out / 'simulate.log'}")
    (out / "wall_seconds.json").write_text(json.dumps({"wall_s": wall}))
    log.info(
        "%s/%s: done in %.0f s: held-out %.3f",
        spec.part,
        spec.name,
        wall,
        done["headline"]["heldout_c_index"],
    )
    return done


def record(spec: RunSpec, results: dict[str, Any], root: Path) -> dict[str, Any]:
    """One row per run: headline numbers (baselines: mean over their models of each model's summary)."""
    from fedprog.federated.outputs import role_summary

    final = results["final"]
    if spec.strategy == "local":
        per_model = {}
        for model in sorted({r["model"] for r in final}):
            rows = [r for r in final if r["model"] == model]
            per_model[model] = {role: role_summary(rows, role)["c_index"] for role in ("holdout", "train")}
        held = float(np.nanmean([v["holdout"] for v in per_model.values()]))
        train = float(np.nanmean([v["train"] for v in per_model.values()]))
    else:
        held = float(results["headline"]["heldout_c_index"])
        train = float(results["headline"]["train_c_index"])
    wall_path = spec.out(root) / "wall_seconds.json"
    wall = json.loads(wall_path.read_text())["wall_s"] if wall_path.is_file() else math.nan
    ceilings = list((results.get("ceilings") or {}).values())
    transfer = float(np.mean([c["transfer_c_index"] for c in ceilings])) if ceilings else math.nan
    return {
        "transfer_ceiling": transfer,
        "part": spec.part,
        "strategy": spec.strategy,
        "modules": spec.modules,
        "seed": spec.seed,
        "heldout_c_index": held,
        "train_c_index": train,
        "rounds": results.get("rounds_completed"),
        "wall_s": wall,
    }


def _cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    sd = values.std(ddof=1) if len(values) > 1 else math.nan
    return f"{values.mean():.3f} ± {sd:.3f}" if math.isfinite(sd) else f"{values.mean():.3f}"


def table(frame: pd.DataFrame) -> str:
    """Markdown: per (strategy, modules), held-out and training-site C-index, mean ± sd over seeds."""
    rows = []
    for (strategy, modules), group in frame.groupby(["strategy", "modules"], sort=False):
        rows.append(
            {
                "strategy": strategy,
                "modules": modules,
                "held-out C-index": _cell(group["heldout_c_index"]),
                "training sites (in-sample)": _cell(group["train_c_index"]),
                "transfer ceiling": _cell(group.get("transfer_ceiling", pd.Series(dtype=float))),
                "seeds": int(group["seed"].nunique()),
                "wall s / run": float(group["wall_s"].mean()),
            }
        )
    return markdown_table(pd.DataFrame(rows), floatfmt=0)


def paired_table(frame: pd.DataFrame, reference: str, keys: Sequence[str] = ("seed",)) -> str:
    """Markdown: each setting minus ``reference`` (``strategy/modules``) on the same ``keys`` (seeds, or
    (target, seed) folds): mean difference, 95% t-interval over the pairs, Wilcoxon signed-rank p, in how many
    pairs the setting is higher, number of pairs."""
    from scipy import stats

    key = frame["strategy"] + "/" + frame["modules"]
    base = frame[key == reference].set_index(list(keys))["heldout_c_index"]
    over = " x ".join(keys)
    rows = []
    for label, group in frame[key != reference].groupby(key[key != reference], sort=False):
        diff = (group.set_index(list(keys))["heldout_c_index"] - base).dropna()
        if len(diff) < 2:
            continue
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff))
        rows.append(
            {
                "setting": label,
                "minus": reference,
                "mean difference": f"{diff.mean():+.3f}",
                f"95% CI (t, over {over})": f"[{diff.mean() - half:+.3f}, {diff.mean() + half:+.3f}]",
                "Wilcoxon p": f"{stats.wilcoxon(diff).pvalue:.2g}" if diff.abs().sum() > 0 else "n/a",
                "higher in": f"{int((diff > 0).sum())} of {len(diff)}",
                "pairs": len(diff),
            }
        )
    if not rows:
        return f"(no setting shares two {over} with the reference)"
    return markdown_table(pd.DataFrame(rows))


def rotate(args: argparse.Namespace) -> int:
    """Run (or tabulate) the grid once per held-out target, then the table over targets and seeds."""
    frames, failed = [], 0
    for target in args.targets:
        log.info("held-out target %s", target)
        specs = grid(
            args.part,
            args.strategies,
            args.modules,
            args.seeds,
            [*args.overrides, f"heldout=[{target}]"],
            args.tcga_strong,
            full=args.all,
        )
        root = args.out / target
        records = collect(specs, root, report_only=args.report_only)
        failed += len(specs) - len(records)
        frames.append(pd.DataFrame(records).assign(target=target))
    frame = pd.concat(frames, ignore_index=True)
    write_json(frame.to_dict("records"), args.out / f"{args.part}_targets_records.json")
    print(f"\n## Held-out C-index per target ({args.part}), final round, mean over seeds\n")
    print(target_table(frame))
    print(f"\n## Paired differences to {args.reference} over (target, seed) pairs\n")
    print(paired_table(frame, args.reference, keys=("target", "seed")))
    return 1 if failed else 0


def collect(specs: Sequence[RunSpec], root: Path, *, report_only: bool) -> list[dict[str, Any]]:
    """Records of the completed cells (runs the missing ones unless ``report_only``)."""
    records = []
    for spec in specs:
        if report_only:
            results = _completed(spec.out(root), spec.overrides)
        else:
            try:
                results = run_one(spec, root)
            except (BenchmarkError, subprocess.TimeoutExpired) as error:
                log.error("%s", error)
                results = None
        if results is not None:
            records.append(record(spec, results, root))
    return records


def target_table(frame: pd.DataFrame) -> str:
    """Markdown: one row per target (and ``overall``), one column per setting, mean over seeds."""
    frame = frame.assign(setting=frame["strategy"] + "/" + frame["modules"])
    wide = frame.pivot_table(index="target", columns="setting", values="heldout_c_index", aggfunc="mean")
    ceiling = frame.groupby("target")["transfer_ceiling"].mean()
    wide["transfer ceiling"] = ceiling
    wide.loc["overall"] = wide.mean()
    in_sample = frame.groupby("setting")["train_c_index"].mean()
    wide.loc["training sites (in-sample)"] = in_sample.reindex(wide.columns)
    return markdown_table(wide.reset_index(), floatfmt=3)


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=sorted(GRID))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--modules", nargs="+", default=list(MODULES), choices=MODULES)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--tcga-strong", choices=sorted(TCGA_STRONG), default="clinical")
    parser.add_argument("--out", type=Path, default=OUT_ROOT)
    parser.add_argument("--report-only", action="store_true", help="only tabulate the runs on disk")
    parser.add_argument("--all", action="store_true", help="also the cells of REDUCED")
    parser.add_argument("--reference", default="pooled/none", help="strategy/modules of the paired reference")
    parser.add_argument(
        "--targets", nargs="+", help="hold out each of these cohorts in turn (heldout=[T], out/<T>/)"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.targets:
        return rotate(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    specs = grid(
        args.part, args.strategies, args.modules, args.seeds, args.overrides, args.tcga_strong, full=args.all
    )
    records, failures = [], []
    for spec in specs:
        if args.report_only:
            results = _completed(spec.out(args.out), spec.overrides)
            if results is None:
                continue
        else:
            try:
                results = run_one(spec, args.out)
            except (BenchmarkError, subprocess.TimeoutExpired) as error:
                log.error("%s", error)
                failures.append(str(error))
                continue
        records.append(record(spec, results, args.out))
    if not records:
        print("no completed run")
        return 1
    frame = pd.DataFrame(records)
    write_json(records, args.out / f"{args.part}_records.json")
    example = specs[0]
    print(f"\n## Held-out C-index by strategy ({args.part}), final round, mean ± sd over seeds\n")
    print(
        "Grid overrides: `"
        + (" ".join(example.overrides[: -3 - len(args.overrides)]) or "(defaults)")
        + "`; per run "
        "`strategy=S modules=M seed=K`"
        + (f" + `{' '.join(args.overrides)}`" if args.overrides else "")
        + ".\n"
    )
    print(table(frame))
    print(f"\n## Paired differences in held-out C-index to {args.reference} (same seeds)\n")
    print(paired_table(frame, args.reference))
    if failures:
        print("\nFailed runs:\n" + "\n".join(f"- {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
