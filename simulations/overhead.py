"""Benchmark (issue #4): overhead of Flower over the same local training, start-up cost and peak memory.

1. A federated run of the generated default federation (``fedprog simulate``, ``RUN_OVERRIDES``: few rounds,
   one local epoch, evaluation only after the last round so that the middle rounds are pure training rounds)
   in a child process, whose whole process tree (the driver, Ray's GCS/raylet/workers and the ClientApp
   actors) is sampled from ``/proc`` every ``SAMPLE_S`` seconds: peak of the summed RSS, and peak RSS of one
   ClientApp actor (``ray::ClientAppActor`` process). RSS counts shared pages in every process that maps them,
   so the sum is an upper bound.
2. The same local work without Flower: for every training round r >= 2 (not the last, which also evaluates),
   each training site rebuilds the model from the run's checkpointed global weights of round r-1 and trains
   with ``fedprog.engine.train`` on its own cases, with the run's preprocessing, config and client seed
   ``derived_seed(seed, r, site)`` - exactly what its ClientApp did. Timed (a) sequentially in one process
   and (b) with 2 worker processes, which is how the simulation runs the clients: Ray gets one CPU per
   ClientApp (``simulation.num_cpus=1``) on a 2-core machine, so 2 actors train in parallel, each with
   ``training.num_threads=1``. Datasets are built once per process and reused across rounds, as the actors
   cache them. Target: a federated round within ``TARGET_RATIO`` of (b).
3. The same federated run with a 4x larger cohort (``data.synth.n_patients`` x 4, generated under another
   root): a client's peak memory stays bounded by the model and one bag (plus its cached tables), not by its
   cohort size.

One-time start-up (interpreter, imports, Ray, node start, the describe/fit queries) is reported apart: the
child's wall time minus the sum of its rounds, and round 1's excess over the later rounds (first dataset
build, first model build).

    python simulations/overhead.py           # writes runs/benchmarks/overhead/, prints the tables

Absolute times depend on the machine and its load: compare the ratios, measured back to back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedprog.report import markdown_table, write_json

log = logging.getLogger("simulations.overhead")

OUT_ROOT = Path("runs/benchmarks/overhead")
ROUNDS = 5
RUN_OVERRIDES = [f"rounds={ROUNDS}", "training.epochs=1", "eval_every=1000", "seed=0"]
COHORT_FACTOR = 4
BIG_ROUNDS = 3  # the 4x-cohort run only needs a few rounds to show its memory
SAMPLE_S = 0.2
PARALLEL_WORKERS = 2
TARGET_RATIO = 1.10
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20
CLIENT_MARK = "ClientAppActor"


class OverheadError(RuntimeError):
    """A run of the benchmark failed; the message names the run folder and its log."""


# ------------------------------------------------------------------------------------------ memory sampling
def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from ``/proc/<pid>/task/*/children``)."""
    seen, stack = [], [root]
    while stack:
        pid = stack.pop()
        seen.append(pid)
        stack.extend(_children(pid))
    return seen


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def cmdline(pid: int) -> str:
    """The process title (Ray sets ``ray::ClientAppActor...`` for the actors)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process tree, the root's own RSS (the simulation driver, which runs the
    ServerApp) and the largest ClientApp actor RSS until stopped."""

    def __init__(self, root: int, interval: float = SAMPLE_S) -> None:  # noqa: D107 - see the class
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_total = 0
        self.peak_root = 0
        self.peak_client = 0
        self.max_processes = 0
        self._halt = threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self._halt.is_set():
            pids = process_tree(self.root)
            sizes = {pid: rss_bytes(pid) for pid in pids}
            self.peak_total = max(self.peak_total, sum(sizes.values()))
            self.peak_root = max(self.peak_root, sizes.get(self.root, 0))
            self.max_processes = max(self.max_processes, len(pids))
            clients = [size for pid, size in sizes.items() if CLIENT_MARK in cmdline(pid)]
            if clients:
                self.peak_client = max(self.peak_client, max(clients))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling and wait for the thread."""
        self._halt.set()
        self.join()


def run_sampled(overrides: Sequence[str], out: Path) -> dict[str, Any]:
    """Run ``fedprog simulate`` in a child process under a :class:`TreeSampler`; timings and memory."""
    out.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).with_name("fedprog")), "simulate", *overrides, f"out={out}"]
    started = time.perf_counter()
    with open(out / "simulate.log", "w") as stream:
        child = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
        sampler = TreeSampler(child.pid)
        sampler.start()
        code = child.wait()
        sampler.stop()
    wall = time.perf_counter() - started
    results_path = out / "results.json"
    if code != 0 or not results_path.is_file():
        raise OverheadError(f"simulation in {out} failed (exit {code}); see {out / 'simulate.log'}")
    results = json.loads(results_path.read_text())
    seconds = [float(r["seconds"]) for r in results["rounds"]]
    return {
        "out": str(out),
        "command": " ".join(["fedprog", "simulate", *overrides, f"out={out}"]),
        "wall_s": wall,
        "round_s": seconds,
        "startup_s": wall - sum(seconds),
        "peak_rss_total_mib": sampler.peak_total / MIB,
        "peak_rss_client_mib": sampler.peak_client / MIB,
        "peak_rss_server_mib": sampler.peak_root / MIB,
        "max_processes": sampler.max_processes,
        "n_cases": sum(int(s["n_cases"]) for s in results["sites"]),
        "n_train_cases": sum(int(s["n_cases"]) for s in results["sites"] if s["role"] == "train"),
    }


# ------------------------------------------------------------------------------------------ local work
_WORKER: dict[str, Any] = {}


def _setup(run_dir: str) -> None:
    """Load the run's config, preprocessing, sites and training datasets (once per process)."""
    import torch

    from fedprog.data import DatasetLayout, build_sites
    from fedprog.federated.checkpoint import load_checkpoint
    from fedprog.pipeline import Preprocessing, make_dataset

    if _WORKER.get("run_dir") == run_dir:
        return
    first = load_checkpoint(Path(run_dir) / "checkpoints" / "round-0000")
    cfg = first.config
    torch.set_num_threads(int(cfg["training"].get("num_threads") or 1))
    prep = Preprocessing.from_state_dict(first.federation["prep"])
    layout = DatasetLayout.load(cfg["data"])
    heldout = cfg.get("heldout")
    sites = [
        s
        for s in build_sites(layout, cfg["federation"], None if heldout is None else list(heldout))
        if s.role == "train"
    ]
    data = {}
    for site in sites:
        cohort = site.load_cohort(layout)
        data[site.name] = make_dataset(
            cohort, site.case_ids, prep, max_patches=cfg["training"].get("max_patches"), seed=int(cfg["seed"])
        )
    # every round's global weights, read once (a client receives them in its message)
    globals_ = {
        int(path.name.split("-")[1]): load_checkpoint(path)
        for path in sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    }
    _WORKER.update(run_dir=run_dir, cfg=cfg, data=data, sites=[s.name for s in sites], globals=globals_)


def train_site(run_dir: str, server_round: int, site: str) -> float:
    """Do site ``site``'s local training of round ``server_round`` as its ClientApp did; return seconds."""
    import torch

    from fedprog import engine
    from fedprog.federated.federation import derived_seed
    from fedprog.pipeline import build_model

    _setup(run_dir)
    cfg, data = _WORKER["cfg"], _WORKER["data"][site]
    previous = _WORKER["globals"][server_round - 1]  # read in _setup: reading is not local work
    started = time.perf_counter()
    seed = derived_seed(int(cfg["seed"]), server_round, site)
    known = set(engine.TrainConfig.__dataclass_fields__)
    train_cfg = engine.TrainConfig.from_cfg(
        {k: v for k, v in cfg["training"].items() if k in known}, seed=seed, proximal_mu=0.0
    )
    data.seed = seed
    data.set_epoch(0)
    model = build_model(cfg["model"], data, loss=str(cfg["training"]["loss"]))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in previous.arrays.items()})
    engine.train(model, data, train_cfg, progress=False)
    seconds = time.perf_counter() - started
    _WORKER.setdefault("models", {})[(server_round, site)] = (
        {k: v.detach().numpy().copy() for k, v in model.state_dict().items()},
        len(data),
    )
    return seconds


def fedavg_gap(run_dir: Path, server_round: int) -> float:
    """Max |example-weighted mean of this process's local models - the run's round-r global weights|.

    Near 0 (float round-off) when the local work repeats exactly what the ClientApps did under FedAvg.
    """
    from fedprog.federated.checkpoint import load_checkpoint

    models = [v for (r, _), v in _WORKER.get("models", {}).items() if r == server_round]
    total = sum(n for _, n in models)
    target = load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:04d}").arrays
    gap = 0.0
    for key, value in target.items():
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            continue
        mean = sum(state[key].astype(np.float64) * n for state, n in models) / total
        gap = max(gap, float(np.max(np.abs(mean - value))))
    return gap


def local_rounds(run_dir: Path, rounds: Sequence[int], workers: int) -> list[float]:
    """Wall seconds of each round's local work: sequential (``workers=1``) or on ``workers`` processes.

    A warm-up round (round 1, not timed) builds the datasets and imports in every process first, as the
    federated run's round 1 does.
    """
    if workers == 1:
        _setup(str(run_dir))
        sites = _WORKER["sites"]
        for site in sites:
            train_site(str(run_dir), 1, site)
        out = []
        for r in rounds:
            started = time.perf_counter()
            for site in sites:
                train_site(str(run_dir), r, site)
            out.append(time.perf_counter() - started)
        return out
    _setup(str(run_dir))
    sites = _WORKER["sites"]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(train_site, [str(run_dir)] * len(sites), [1] * len(sites), sites))  # warm-up
        out = []
        for r in rounds:
            started = time.perf_counter()
            list(pool.map(train_site, [str(run_dir)] * len(sites), [r] * len(sites), sites))
            out.append(time.perf_counter() - started)
    return out


# ------------------------------------------------------------------------------------------ main
def _big_cohort_overrides(out: Path) -> list[str]:
    from fedprog.config import load_config

    base = load_config("simulate", [])
    sizes = [int(n) * COHORT_FACTOR for n in base.data.synth.n_patients]
    return [
        f"data.root={out / 'data_synth_x4'}",
        "data.synth.n_patients=[" + ",".join(map(str, sizes)) + "]",
    ]


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT_ROOT)
    parser.add_argument("--skip-big", action="store_true", help="skip the 4x-cohort memory run")
    parser.add_argument(
        "--local-epochs", type=int, default=1, help="training.epochs per round (longer rounds: less noise)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    out = args.out.resolve()

    overrides = [*RUN_OVERRIDES, f"training.epochs={args.local_epochs}"]
    fed = run_sampled(overrides, out / "federated")
    log.info("federated run: %.0f s, rounds %s", fed["wall_s"], [f"{s:.1f}" for s in fed["round_s"]])
    middle = list(range(2, ROUNDS))  # rounds after the first, before the last (which also evaluates)
    fed_middle = [fed["round_s"][r - 1] for r in middle]
    sequential = local_rounds(Path(fed["out"]), middle, 1)
    gaps = [fedavg_gap(Path(fed["out"]), r) for r in middle]
    log.info("max |FedAvg of the local models - checkpointed global weights| per round: %s", gaps)
    parallel = local_rounds(Path(fed["out"]), middle, PARALLEL_WORKERS)
    records: dict[str, Any] = {
        "federated": fed,
        "middle_rounds": middle,
        "local_sequential_s": sequential,
        "local_parallel_s": parallel,
        "fedavg_gap": gaps,
    }
    if not args.skip_big:
        from fedprog.config import load_config
        from fedprog.data.synth import ensure_generated

        # generate the larger cohort first, so that its generation is not part of the sampled run
        ensure_generated(load_config("simulate", _big_cohort_overrides(out)).data)
        big = run_sampled(
            [*overrides, f"rounds={BIG_ROUNDS}", *_big_cohort_overrides(out)], out / "federated_x4"
        )
        records["federated_x4"] = big
    write_json(records, out / "overhead.json")

    f_mean, s_mean, p_mean = float(np.mean(fed_middle)), float(np.mean(sequential)), float(np.mean(parallel))
    print("\n## Overhead of a federated round (rounds " + ", ".join(map(str, middle)) + ")\n")
    print(f"Command: `{fed['command']}`\n")
    timing = pd.DataFrame(
        [
            {
                "what": "federated round (Flower simulation, 2 actors x 1 CPU)",
                "s / round": f_mean,
                "ratio": 1.0,
            },
            {
                "what": f"same local training, {PARALLEL_WORKERS} processes (as the simulation)",
                "s / round": p_mean,
                "ratio": f_mean / p_mean,
            },
            {
                "what": "same local training, sequential (1 process)",
                "s / round": s_mean,
                "ratio": f_mean / s_mean,
            },
        ]
    )
    print(markdown_table(timing, floatfmt=2))
    print(
        f"\nSame work check: the example-weighted mean of the local models differs from the run's global "
        f"weights by at most {max(gaps):.2e} (rounds {middle})."
    )
    print(
        f"\nOne-time start-up (wall {fed['wall_s']:.1f} s minus the rounds): {fed['startup_s']:.1f} s; "
        f"round 1 took {fed['round_s'][0]:.1f} s vs {f_mean:.1f} s for later training rounds "
        f"(+{fed['round_s'][0] - f_mean:.1f} s first dataset/model build); the last round also evaluates "
        f"every site ({fed['round_s'][-1]:.1f} s)."
    )
    ratio = f_mean / p_mean
    print(
        f"\nTarget (federated round within {TARGET_RATIO:.2f}x of the same local work, run as the simulation "
        f"runs it): {'MET' if ratio <= TARGET_RATIO else 'NOT MET'} ({ratio:.2f}x)."
    )
    rows = [{"run": "default cohort", **_memory_row(fed)}]
    if "federated_x4" in records:
        rows.append({"run": f"{COHORT_FACTOR}x cohort", **_memory_row(records["federated_x4"])})
        print(f"\n4x-cohort command: `{records['federated_x4']['command']}`")
    print("\n## Peak memory (RSS, MiB)\n")
    print(markdown_table(pd.DataFrame(rows), floatfmt=0))
    return 0


def _memory_row(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "cases (train)": f"{run['n_cases']} ({run['n_train_cases']})",
        "whole simulation (sum over process tree)": run["peak_rss_total_mib"],
        "one ClientApp actor": run["peak_rss_client_mib"],
        "processes": run["max_processes"],
        "s / round": float(np.mean(run["round_s"][1:-1] or run["round_s"])),
    }


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
