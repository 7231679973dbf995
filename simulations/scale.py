"""Benchmark (issue #13): what a simulated federation costs as sites, cases per site and bag size grow.

Every setting is a generated federation of ``CANCERS`` cancers (the last one held out) with ``sites /
CANCERS`` hospitals per cancer of ``CASES_PER_SITE x factor`` patients, generated before it is timed. Three
axes:

- sites: 8, 32, 128 (``--quick``: 8, 32), bags of the generated default (16-128 patches);
- cases per site: x1, x4 at 8 sites;
- bag size: 512, 4,096, 16,384 patches per slide (``--quick``: 512, 4,096) at 8 sites, with
  ``training.max_patches`` equal to the bag size, so that training sees whole bags.

Each setting runs ``fedprog simulate`` in a child process whose process tree is sampled from ``/proc``
(``overhead.run_sampled``): peak RSS of the driver (the ServerApp's process), of the largest ClientApp actor
and of the whole tree. The run has ``ROUNDS`` rounds of one local epoch, every training site trains every
round (``strategy.fraction_train=1``) and sites evaluate only after the last round, so the middle rounds are
pure training rounds. Ray gets ``--ray-cpus`` CPUs (1 by default: one ClientApp at a time, the same single
core as the reference below, so the ratio is Flower's own cost). The reference is the same local work
without Flower (``overhead.local_rounds``, sequential): for each middle round every training site rebuilds
the model from the run's checkpointed global weights and runs ``fedprog.engine.train`` with the run's config
and client seed; ``gap`` is the largest difference between the FedAvg of those local models and the run's
next global weights. The reference starts each round with a fresh optimizer while the sites keep their Adam
moments across rounds (``training.keep_optimizer_state``), so the gap is ~1e-2 for the same number of steps;
with ``training.keep_optimizer_state=false`` it was 1.3e-7 (8 sites), i.e. the same work.

Where the time goes, from the server's per-round timers (``results.json`` rounds ``timing``): ``client
train`` (engine.train time the sites report, summed), ``Flower + Ray`` (waiting for the training replies
minus that: messages, serialization, scheduling, per message the model rebuilt and the optimizer state
stored), ``aggregate`` (screening and the strategy's mean), ``evaluate`` (the last round); ``start-up`` is
the child's wall time minus its rounds (interpreter, imports, Ray, node start, the describe/fit queries,
writing the report) and ``first round +`` is round 1's excess over the middle rounds (datasets and model
built the first time).

    python simulations/scale.py            # every setting (10 min 20 s on 2 shared cores)
    python simulations/scale.py --quick    # 8 and 32 sites, x1/x4 cases, bags of 512 and 4,096 (< 5 min)

Records go to ``runs/benchmarks/scale/`` (``scale.json``, a log-log plot ``scale.png``). The last line
printed is ``scale: <sites> sites ... <ratio>`` for the largest site count. Absolute times depend on the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from overhead import _WORKER, fedavg_gap, local_rounds, run_sampled

from fedprog.config import load_config
from fedprog.data.synth import ensure_generated
from fedprog.report import markdown_table, write_json

log = logging.getLogger("simulations.scale")

OUT_ROOT = Path("runs/benchmarks/scale")
CANCERS = 4  # c0..c3; c3's hospitals are held out
CASES_PER_SITE = 20  # x1: enough for every site's disclosure minimum (10 cases, 3 events)
SITES = (8, 32, 128)
QUICK_SITES = (8, 32)
CASE_FACTORS = (1, 4)
BAG_PATCHES = (512, 4096, 16384)
QUICK_BAG_PATCHES = (512, 4096)
ROUNDS = 4  # round 1 warms up, rounds 2..ROUNDS-1 are timed, the last one also evaluates
QUICK_ROUNDS = 3
RUN_OVERRIDES = ["training.epochs=1", "eval_every=1000", "seed=0", "strategy.fraction_train=1.0"]


@dataclass(frozen=True)
class Setting:
    """One point of the cost curve."""

    axis: str
    sites: int
    case_factor: int = 1
    patches: int | None = None  # None: the generated default bags (16-128 patches per slide)

    @property
    def name(self) -> str:
        bag = "default" if self.patches is None else str(self.patches)
        return f"s{self.sites}_x{self.case_factor}_p{bag}"

    def data_overrides(self, root: Path) -> list[str]:
        """Overrides of ``data.synth`` (and ``training.max_patches``) that generate this federation."""
        base = load_config("simulate", []).data.synth
        per_cancer = self.sites // CANCERS

        def first(values: Any) -> str:
            return "[" + ",".join(str(v) for v in list(values)[:CANCERS]) + "]"

        out = [
            f"data.root={root / self.name}",
            f"data.synth.cancers=[{','.join(f'c{k}' for k in range(CANCERS))}]",
            f"data.synth.n_patients={first([per_cancer * CASES_PER_SITE * self.case_factor] * CANCERS)}",
            "data.synth.site_fractions=[" + ",".join(["1.0"] * per_cancer) + "]",
            f"data.synth.survival.weibull_scale={first(base.survival.weibull_scale)}",
            f"data.synth.survival.weibull_shape={first(base.survival.weibull_shape)}",
            f"data.synth.survival.censoring={first(base.survival.censoring)}",
            f"heldout=[c{CANCERS - 1}]",
        ]
        if self.patches is not None:
            out += [
                f"data.synth.patches=[{self.patches},{self.patches}]",
                f"training.max_patches={self.patches}",
            ]
        return out


def settings(quick: bool) -> list[Setting]:
    """The settings of the three axes (the 8-site, x1, default-bag setting is shared by the first two)."""
    sites = QUICK_SITES if quick else SITES
    out = [Setting("sites", n) for n in sites]
    out += [Setting("cases", min(sites), factor) for factor in CASE_FACTORS if factor != 1]
    out += [Setting("bag", min(sites), 1, p) for p in (QUICK_BAG_PATCHES if quick else BAG_PATCHES)]
    return out


def measure(setting: Setting, out: Path, rounds: int, ray_cpus: int) -> dict[str, Any]:
    """Generate, run federated (sampled), then the same local work; one record of the cost curve."""
    data = setting.data_overrides(out / "data")
    started = time.perf_counter()
    ensure_generated(load_config("simulate", data).data)
    generated = time.perf_counter() - started
    overrides = [*RUN_OVERRIDES, f"rounds={rounds}", f"simulation.ray_num_cpus={ray_cpus}", *data]
    fed = run_sampled(overrides, out / "runs" / setting.name)
    run_dir = Path(fed["out"])
    middle = list(range(2, rounds))
    _WORKER.clear()  # the local reference of the previous setting (its datasets and models)
    local = local_rounds(run_dir, middle, 1)
    gap = max(fedavg_gap(run_dir, r) for r in middle)
    results = json.loads((run_dir / "results.json").read_text())
    timing = pd.DataFrame([r["timing"] for r in results["rounds"]])
    seconds = np.array(fed["round_s"])
    round_s = float(seconds[1:-1].mean())
    mid = timing.iloc[1:-1].mean()
    record = {
        "axis": setting.axis,
        "sites": setting.sites,
        "train sites": setting.sites - setting.sites // CANCERS,
        "cases/site": CASES_PER_SITE * setting.case_factor,
        "patches": "16-128" if setting.patches is None else setting.patches,
        "round s": round_s,
        "local s": float(np.mean(local)),
        "ratio": round_s / float(np.mean(local)),
        "client train s": float(mid["client_train"]),
        "Flower + Ray s": float(mid["train_wait"] - mid["client_train"]),
        "aggregate s": float(mid["aggregate"]),
        "evaluate s": float(timing["evaluate"].iloc[-1]),
        "first round + s": float(seconds[0] - round_s),
        "start-up s": fed["startup_s"],
        "server MiB": fed["peak_rss_server_mib"],
        "client MiB": fed["peak_rss_client_mib"],
        "total MiB": fed["peak_rss_total_mib"],
        "gap": gap,
        "generate s": generated,
        "command": fed["command"],
    }
    log.info("%s: %s", setting.name, {k: v for k, v in record.items() if k != "command"})
    return record


def plot(table: pd.DataFrame, path: Path) -> Path:
    """Log-log plot of round time and peak client / server memory against sites, cases and bag size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    figure = Figure(figsize=(12, 3.8))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    x_of = {
        "sites": ("sites", table["axis"] == "sites"),
        "cases per site": ("cases/site", table["sites"].eq(table["sites"].min()) & (table["axis"] != "bag")),
        "patches per bag": ("patches", table["axis"] == "bag"),
    }
    for ax, (label, (column, rows)) in zip(axes, x_of.items(), strict=True):
        part = table[rows].sort_values(column)
        x = part[column].astype(float)
        for y, style in (("round s", "o-"), ("local s", "s--"), ("client MiB", "^-"), ("server MiB", "v-")):
            ax.plot(x, part[y], style, label=y)
        ax.set(xscale="log", yscale="log", xlabel=label, title=f"cost vs {label}")
        ax.set_xticks(x.tolist(), [f"{v:g}" for v in x])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="8 and 32 sites, bags of 512 and 4,096 (< 5 min)"
    )
    parser.add_argument("--out", type=Path, default=OUT_ROOT)
    parser.add_argument("--ray-cpus", type=int, default=1, help="simulation.ray_num_cpus of every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    out = args.out.resolve()
    rounds = QUICK_ROUNDS if args.quick else ROUNDS
    started = time.perf_counter()
    records = [measure(s, out, rounds, args.ray_cpus) for s in settings(args.quick)]
    table = pd.DataFrame(records)
    write_json({"rounds": rounds, "ray_cpus": args.ray_cpus, "records": records}, out / "scale.json")
    plot(table, out / "scale.png")
    shown = table.drop(columns=["command", "generate s", "gap"])
    print(
        f"\n## Cost curve ({rounds} rounds, Ray CPUs {args.ray_cpus}; "
        f"round s: mean of rounds 2..{rounds - 1})\n"
    )
    print(markdown_table(shown, floatfmt=2))
    print(
        "\nSame steps: FedAvg of the local models vs the run's global weights, max gap "
        f"{table['gap'].max():.1e} (the sites' kept Adam moments; the reference starts each round afresh)."
    )
    print(f"Total benchmark wall time {time.perf_counter() - started:.0f} s; plot {out / 'scale.png'}.")
    sites = table[table["axis"] == "sites"].sort_values("sites")
    ratios = "/".join(f"{r:.2f}" for r in sites["ratio"])
    top = sites.iloc[-1]
    print(
        f"scale: {int(top['sites'])} sites round {top['round s']:.2f} s, client {top['client MiB']:.0f} MiB, "
        f"server {top['server MiB']:.0f} MiB; federated/local ratio at "
        f"{'/'.join(str(n) for n in sites['sites'])} sites {ratios}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
