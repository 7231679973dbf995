"""Benchmark (issue #13, deployment at size): one run on a loopback consortium of N warm SuperNodes.

Builds a :class:`fedprog.deploy.loopback.LoopbackConsortium` of ``--sites`` hospitals (one generated cancer
of 30 patients each, the last one held out): a consortium CA, a SuperLink with TLS and node authentication
(``fedprog server start``), every site's key enrolled (``fedprog server enrol``), and one warm SuperNode per
site pinned to the app's FAB hash (``fedprog site start``: data check, SuperNode, warm SuperExec). Once every
SuperExec has preloaded the app, it submits one run of ``--rounds`` rounds with
:func:`fedprog.deploy.server.start_run` (``fedprog server run``: tiny model, one local epoch) and checks that
it completed with every site in ``results.json``. Every process is stopped by PID at the end, also on failure.

Memory is sampled from ``/proc`` every ``SAMPLE_S`` seconds (``overhead.process_tree``): for each site the
process tree of its SuperNode and its warm SuperExec (with the ClientApp task it forks per message), and for
the coordinator the SuperLink's tree (the gate, Flower's SuperLink, the SuperExec and ServerApp it starts);
the ``flwr run --stream`` client that submits and follows the run is shown apart (``flwr CLI``).
"idle" is the median RSS over ``IDLE_S`` seconds once every site is warm, before the run; "peak" is the
largest RSS during start-up and the run. RSS counts the pages a forked task shares with its SuperExec twice;
PSS (``/proc/<pid>/smaps_rollup``) splits shared pages between the processes, so the PSS of all sites and the
coordinator adds up to what the machine holds.

    python simulations/deploy_scale.py [--sites 8] [--rounds 2]

Records go to ``runs/benchmarks/deploy_scale/`` (``deploy_scale-<N>.json``, the consortium folder with every
log). The last line printed is ``deploy_scale: <N> sites completed in <s> s; site RSS median <MiB> MiB (max
<MiB>); coordinator <MiB> MiB`` (run wall time; peak RSS per site, median and max over the sites).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from overhead import MIB, _children, process_tree, rss_bytes

from fedprog.deploy import processes, server
from fedprog.deploy.loopback import LoopbackConsortium, synth_sites
from fedprog.report import markdown_table, write_json

log = logging.getLogger("simulations.deploy_scale")

OUT_ROOT = Path("runs/benchmarks/deploy_scale")
SITES = 8
ROUNDS = 2
SAMPLE_S = 0.5  # /proc sampling period (a tiny ClientApp task lives a few seconds)
IDLE_S = 3.0  # warm and idle: sampled this long before the run
WARM_TIMEOUT_S = 600.0  # every SuperExec imports torch and fedprog at once on a shared machine
COORDINATOR = "coordinator"
CLI = "flwr CLI"  # this script's other children: the `flwr run --stream` that follows the run
KIB = 1024


class DeployScaleError(RuntimeError):
    """The run failed or its report lacks a site; the message names the folder and the log."""


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * KIB
    except (OSError, IndexError, ValueError):
        return 0
    return 0


class GroupSampler(threading.Thread):
    """Samples the RSS and PSS of named groups of process trees (a site: SuperNode + SuperExec) until stopped.

    Each sample is tagged with the current :attr:`phase`, so a window (e.g. ``idle``) can be read apart.
    """

    def __init__(self, groups: Mapping[str, Sequence[int]], interval: float = SAMPLE_S) -> None:  # noqa: D107
        super().__init__(daemon=True)
        self.groups, self.interval = {name: list(roots) for name, roots in groups.items()}, interval
        self.phase = "start-up"
        self.samples: list[tuple[str, str, int, int, int]] = []  # phase, group, rss, pss, processes
        self._halt = threading.Event()

    def run(self) -> None:  # noqa: D102
        known = {root for roots in self.groups.values() for root in roots}
        while not self._halt.is_set():
            phase = self.phase
            others = [pid for pid in _children(os.getpid()) if pid not in known]  # `flwr run`
            for name, roots in {**self.groups, CLI: others}.items():
                pids = {pid for root in roots for pid in process_tree(root) if rss_bytes(pid)}
                rss = sum(rss_bytes(pid) for pid in pids)
                pss = sum(pss_bytes(pid) for pid in pids)
                self.samples.append((phase, name, rss, pss, len(pids)))
            self._halt.wait(self.interval)

    def stop(self) -> pd.DataFrame:
        """Stop sampling; return the samples (phase, group, rss, pss, processes)."""
        self._halt.set()
        self.join()
        return pd.DataFrame(self.samples, columns=["phase", "group", "rss", "pss", "processes"])


def _groups(dep: LoopbackConsortium) -> dict[str, list[int]]:
    """Coordinator: the SuperLink's PID; each site: its SuperNode and SuperExec PIDs (from ``running``)."""
    groups: dict[str, list[int]] = {COORDINATOR: [], **{name: [] for name in dep.sites}}
    for proc in dep.running:
        owner = COORDINATOR if proc.name == "superlink" else proc.name.split("-", 1)[1]
        groups[owner].append(proc.pid)
    return groups


def check_results(out: Path, sites: Sequence[str], rounds: int, run_log: Path) -> dict[str, Any]:
    """Return ``results.json`` after checking the run completed ``rounds`` rounds with every site."""
    path = out / "results.json"
    if not path.is_file():
        raise DeployScaleError(f"{path} was not written; see {run_log}:\n{processes.log_tail(run_log)}")
    results = json.loads(path.read_text())
    missing = sorted(set(sites) - {str(s["site"]) for s in results["sites"]})
    if results["status"] != "completed" or int(results["rounds_completed"]) != rounds or missing:
        raise DeployScaleError(
            f"{path}: status {results['status']}, {results['rounds_completed']}/{rounds} rounds, "
            f"sites missing {missing}; see {run_log}"
        )
    return results


def measure(n_sites: int, rounds: int, root: Path) -> dict[str, Any]:
    """Build, start and run the loopback consortium in ``root`` (wiped first); timings and memory."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sites, data = synth_sites(n_sites)
    began = time.monotonic()
    with LoopbackConsortium(root, sites, data_overrides=data) as dep:  # stops every process by PID
        build_s = time.monotonic() - began
        dep.start()
        sampler = GroupSampler(_groups(dep))
        sampler.start()
        try:
            warm_s = dep.wait_warm(WARM_TIMEOUT_S)
            sampler.phase = "idle"
            time.sleep(IDLE_S)
            sampler.phase = "run"
            settings = dep.run_settings("run", f"rounds={rounds}")
            run_began = time.monotonic()
            code = server.start_run(settings)
            run_s = time.monotonic() - run_began
        finally:
            samples = sampler.stop()
        run_log = root / "srv" / server.RUN_LOG_FILE
        if code != 0:
            raise DeployScaleError(
                f"`server run` exited with {code}; see {run_log}:\n{processes.log_tail(run_log)}"
            )
        results = check_results(Path(settings.out), list(sites), rounds, run_log)
    return {
        "sites": n_sites,
        "rounds": rounds,
        "roles": {name: role for name, (_, role) in sites.items()},
        "build_s": build_s,
        "startup_s": {**dep.startup_s, "warm": warm_s},
        "run_s": run_s,
        "round_s": [float(r["seconds"]) for r in results["rounds"]],
        "memory": memory(samples),
        "root": str(root),
    }


def memory(samples: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per group: idle RSS (median over the idle window), peak RSS, peak PSS (MiB) and most processes."""
    out: dict[str, dict[str, float]] = {}
    for name, rows in samples.groupby("group", sort=False):
        idle = rows.loc[rows["phase"] == "idle", "rss"]
        out[str(name)] = {
            "idle_rss_mib": float(idle.median()) / MIB if len(idle) else float("nan"),
            "peak_rss_mib": float(rows["rss"].max()) / MIB,
            "peak_pss_mib": float(rows["pss"].max()) / MIB,
            "processes": int(rows["processes"].max()),
        }
    return out


def table(record: Mapping[str, Any]) -> pd.DataFrame:
    """One row per site and one for the coordinator: role and memory."""
    rows = []
    for name, values in record["memory"].items():
        role = {COORDINATOR: "SuperLink + ServerApp", CLI: "coordinator CLI"}.get(
            name, f"{record['roles'].get(name)} site"
        )
        rows.append(
            {
                "process tree": name,
                "role": role,
                "processes": values["processes"],
                "idle RSS MiB": values["idle_rss_mib"],
                "peak RSS MiB": values["peak_rss_mib"],
                "peak PSS MiB": values["peak_pss_mib"],
            }
        )
    return pd.DataFrame(rows)


def summary_line(record: Mapping[str, Any]) -> str:
    """The last line printed: sites, run wall time, site peak RSS (median, max), coordinator peak RSS."""
    peaks = [v["peak_rss_mib"] for name, v in record["memory"].items() if name in record["roles"]]
    return (
        f"deploy_scale: {record['sites']} sites completed in {record['run_s']:.1f} s; site RSS median "
        f"{statistics.median(peaks):.0f} MiB (max {max(peaks):.0f}); coordinator "
        f"{record['memory'][COORDINATOR]['peak_rss_mib']:.0f} MiB"
    )


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=SITES, help="hospitals (SuperNodes); the last holds out")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of the run")
    parser.add_argument("--out", type=Path, default=OUT_ROOT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out.resolve()
    record = measure(args.sites, args.rounds, out / f"sites-{args.sites}")
    write_json(record, out / f"deploy_scale-{args.sites}.json")
    steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in record["startup_s"].items())
    pss = sum(v["peak_pss_mib"] for v in record["memory"].values())
    print(f"\n## {args.sites} warm sites, {args.rounds} rounds (TLS + node authentication, pinned app)\n")
    print(markdown_table(table(record), floatfmt=0))
    print(
        f"\nBuild (certificates, data, app hash) {record['build_s']:.1f} s; start-up {steps}; run "
        f"{record['run_s']:.1f} s (rounds {', '.join(f'{s:.1f}' for s in record['round_s'])} s); "
        f"sum of peak PSS {pss:.0f} MiB."
    )
    print(summary_line(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
