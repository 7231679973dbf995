"""Leave-one-cancer-out benchmark of centralized settings, then their paired comparison.

Each ``--setting LABEL="override ..."`` runs ``fedprog train rotation=loco label=LABEL <overrides>`` (every
cohort held out in turn, sources pooled, seeds of configs/rotation/loco.yaml unless overridden) into
``OUT/LABEL``; then the runs are compared (fedprog.compare: per-target mean C-index with bootstrap CI beside
the ceilings, paired differences to the first setting, forest plot) into ``OUT/compare``. Example::

    PYTHONPATH=. python simulations/rotation.py --out runs/rotation \\
        --setting snn-expr="model=snn" --setting survpath="model=survpath" -- rotation.seeds=[0,1,2,3,4]

Overrides after ``--`` apply to every setting. A run that wrote ``rotation.json`` and ``predictions.csv.gz``
(same format, e.g. simulations/fedavg_optimizer.py --rotation) is added with ``--run DIR``.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from fedprog import protocol
from fedprog.compare import compare
from fedprog.config import load_config


def run_setting(label: str, overrides: list[str], common: list[str], out: Path) -> Path:
    """Run one rotation and return its run folder."""
    cfg = load_config("train", ["rotation=loco", f"label={label}", f"out={out / label}", *common, *overrides])
    protocol.main(cfg)
    return out / label  # out= is the run folder itself


def main() -> None:
    """Parse the settings, run each rotation, compare them and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/rotation"))
    parser.add_argument("--setting", action="append", default=[], help='LABEL="hydra overrides"')
    parser.add_argument(
        "--run", action="append", default=[], type=Path, help="folder of an existing rotation run"
    )
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("common", nargs="*", help="overrides for every setting (after --)")
    args = parser.parse_args()
    runs = []
    for item in args.setting:
        label, _, overrides = item.partition("=")
        runs.append(run_setting(label, shlex.split(overrides), args.common, args.out))
    runs.extend(args.run)
    tables = compare(runs, args.out / "compare", n_boot=args.n_boot)
    columns = ["setting", "target", "c_index", "ci_low", "ci_high", "transfer_c_index", "oracle_c_index"]
    print(tables["settings"][columns].to_string(index=False, float_format="%.3f"))
    print(tables["paired"].to_string(index=False, float_format="%.3f"))
    print(f"\n{args.out / 'compare' / 'comparison.md'}")


if __name__ == "__main__":
    main()
