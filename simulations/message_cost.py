"""Benchmark (issue #13): where a training message's time goes on the client, outside training itself.

Runs the 32-site setting of ``simulations/scale.py`` (4 cancers x 8 hospitals of 20 patients, one local epoch
per round) in this process over the tests' in-process grid (``tests/fed_helpers.DirectGrid``: the ServerApp
and the ClientApp handlers, no Ray, no message transport), under ``cProfile``. It prints, per training
message, the mean milliseconds of the handler, of ``engine.train`` inside it and of each step around it
(the model rebuilt from the message's weights, the weights packed into the reply, the optimizer state kept
for exact resume written and read, the site resolved), and ends with one line ``message_cost: ...``. What
``scale.py`` reports as "Flower + Ray" per site minus this client-side share is the transport (Ray,
serialization of the messages).

    python simulations/message_cost.py [--sites 32] [--rounds 4]

The first round also builds each site's datasets (``site_datasets``, cached afterwards); it is shown apart.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the in-process grid of the federated tests

from fed_helpers import DirectGrid  # noqa: E402
from scale import OUT_ROOT, RUN_OVERRIDES, Setting  # noqa: E402

from fedprog.config import load_config  # noqa: E402
from fedprog.data.synth import ensure_generated  # noqa: E402
from fedprog.federated.server_app import run_federation  # noqa: E402
from fedprog.report import markdown_table  # noqa: E402

#: (label, pstats function key suffix): the client-side steps of one training message.
STEPS = (
    ("train handler (total)", ("client_app.py", "train_site")),
    ("engine.train", ("engine.py", "train")),
    ("model rebuilt from the message", ("client_app.py", "_model")),
    ("optimizer state written (resume)", ("site_state.py", "save")),
    ("optimizer state read", ("client_app.py", "_kept_optimizer_state")),
    ("site resolved", ("client_app.py", "resolve_site")),
    ("datasets (built in round 1, cached)", ("client_app.py", "site_datasets")),
)


def _stat(stats: pstats.Stats, file_suffix: str, name: str) -> tuple[int, float]:
    """(calls, cumulative seconds) of the function ``name`` defined in a file ending with ``file_suffix``."""
    for (path, _, func), (_, ncalls, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and path.endswith(file_suffix):
            return int(ncalls), float(cumtime)
    return 0, 0.0


def _packing(stats: pstats.Stats) -> tuple[int, float]:
    """ArrayRecord construction called from train_site: the trained weights packed into the reply."""
    for (path, _, func), callers in ((k, v[4]) for k, v in stats.stats.items()):  # type: ignore[attr-defined]
        if func == "__init__" and path.endswith("arrayrecord.py"):
            for (cpath, _, cfunc), (_, ncalls, _, cumtime) in callers.items():
                if cfunc == "train_site" and cpath.endswith("client_app.py"):
                    return int(ncalls), float(cumtime)
    return 0, 0.0


def main(argv: list[str]) -> int:
    """Profile the in-process federation and print the per-message table and the final line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    data = Setting("sites", args.sites).data_overrides(OUT_ROOT / "data")
    ensure_generated(load_config("simulate", data).data)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            "simulate",
            [*RUN_OVERRIDES, f"rounds={args.rounds}", *data, f"out={out}", f"expected_sites={args.sites}"],
        )
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        run_federation(DirectGrid(args.sites), cfg)
        profile.disable()
        wall = time.perf_counter() - started
    stats = pstats.Stats(profile)
    rows = []
    for label, (suffix, name) in STEPS:
        calls, seconds = _stat(stats, suffix, name)
        rows.append({"step": label, "calls": calls, "ms per call": 1000 * seconds / max(calls, 1)})
        if label == "engine.train":
            calls, seconds = _packing(stats)
            per_call = 1000 * seconds / max(calls, 1)
            rows.append({"step": "weights packed (ArrayRecord)", "calls": calls, "ms per call": per_call})
    table = {row["step"]: row for row in rows}
    total = table["train handler (total)"]
    outside = total["ms per call"] - table["engine.train"]["ms per call"]
    first_round = table["datasets (built in round 1, cached)"]
    dataset_share = first_round["ms per call"] * first_round["calls"] / max(total["calls"], 1)
    print(f"\n## Client-side cost of a training message ({args.sites} sites, {args.rounds} rounds)\n")
    print(markdown_table(pd.DataFrame(rows), floatfmt=1))
    print(f"\nProfiled wall time {wall:.1f} s (cProfile slows Python-heavy code).")
    print(
        f"message_cost: {outside:.1f} ms per training message outside engine.train, of which "
        f"{dataset_share:.1f} ms is round 1's dataset building averaged over all messages"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
