"""Benchmark: cross-cancer generalization of backbones with and without SDIR/CADE (issue #3).

Runs the ``fedprog train`` protocol (each source cancer -> every other cancer) for a grid of backbones and
module settings, then prints the source -> target C-index table (mean and spread over seeds) with the oracle
C-index beside each cell where the data carry the true risk (generated data).

    python simulations/cross_cancer.py synth            # generated default, WSI + expression
    python simulations/cross_cancer.py tcga             # real TCGA expression (+ clinical), 4 cancers
    python simulations/cross_cancer.py tcga seeds=[0]   # extra Hydra overrides apply to every run

Writes ``<out>/cross_cancer_<preset>.json`` (every record) and prints markdown tables.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd

from fedprog.config import load_config
from fedprog.protocol import run_protocol
from fedprog.report import markdown_table, write_json

# (label, Hydra overrides) per run of the protocol; every preset shares its `common` overrides.
PRESETS: dict[str, dict[str, list]] = {
    "synth": {
        "common": ["data=synth", "seeds=[0,1]", "model.dim=64", "training.epochs=10", "km_plots=false"],
        "runs": [
            *[
                (f"{backbone} {modules}", [f"model={backbone}", f"modules={modules}"])
                for backbone in ("survpath", "mcat", "late_fusion")
                for modules in ("none", "sdir", "cade", "sdir_cade")
            ],
            ("abmil (WSI only)", ["model=abmil"]),
            ("snn (expression only)", ["model=snn"]),
        ],
    },
    "tcga": {
        "common": [
            "data=tcga",
            "seeds=[0,1,2]",
            "model.dim=64",
            "training.epochs=30",
            "training.batch_size=32",
            "training.grad_accum=1",
            "training.lr=1e-3",
            "km_plots=false",
        ],
        "runs": [
            ("snn (expression only)", ["model=snn", "data.strong=null"]),
            *[
                (f"{backbone} {modules}", [f"model={backbone}", f"modules={modules}", "data.strong=clinical"])
                for backbone in ("survpath", "mcat", "late_fusion")
                for modules in ("none", "sdir_cade")
            ],
        ],
    },
}


def run_preset(preset: str, extra: list[str], out: Path) -> pd.DataFrame:
    """Run every configuration of ``preset``; return all records as a table."""
    spec = PRESETS[preset]
    records = []
    for label, overrides in spec["runs"]:
        cfg = load_config("train", [*spec["common"], *overrides, *extra])
        started = time.perf_counter()
        for record in run_protocol(cfg):
            records.append({"run": label, **record})
        logging.info("%s done in %.0f s", label, time.perf_counter() - started)
        write_json(records, out / f"cross_cancer_{preset}.json")
    return pd.DataFrame(records)


def tables(frame: pd.DataFrame) -> str:
    """Markdown: per run, the mean (sd) C-index of every source -> target pair and the average over pairs."""
    targets = frame[frame["split"] == "target"]
    stats = targets.groupby(["run", "source", "target"]).agg(
        mean=("c_index", "mean"), sd=("c_index", "std"), oracle=("oracle_c_index", "mean")
    )
    stats["cell"] = stats.apply(
        lambda r: f"{r['mean']:.3f} ({r['sd']:.3f})" + (f" / {r['oracle']:.2f}" if pd.notna(r["oracle"]) else ""),
        axis=1,
    )
    pairs = stats["cell"].unstack(["source", "target"])
    pairs.columns = [f"{s}->{t}" for s, t in pairs.columns]
    per_seed = targets.groupby(["run", "seed"])["c_index"].mean().groupby("run")
    pairs.insert(0, "mean over pairs", per_seed.mean().map("{:.3f}".format) + " ± " + per_seed.std().map(
        "{:.3f}".format
    ))
    in_domain = frame[frame["split"] != "target"].groupby("run")["c_index"].mean().map("{:.3f}".format)
    pairs.insert(1, "in-domain (val)", in_domain)
    return markdown_table(pairs.reset_index())


def main(argv: list[str]) -> int:
    """Entry point: ``cross_cancer.py PRESET [overrides...]``."""
    if not argv or argv[0] not in PRESETS:
        print(__doc__)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path("runs/benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    frame = run_preset(argv[0], argv[1:], out)
    print(f"\n## Cross-cancer C-index, preset {argv[0]}: mean (sd over seeds) [/ oracle]\n")
    print(tables(frame))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
