"""Benchmark (issue #13): the cost of one training message in Flower's simulation engine with no fedprog code.

A ServerApp sends one ``train`` message per node per round, carrying a model-sized ``ArrayRecord`` (by
default the size of the ``fedprog simulate`` default model: 204,548 float32 weights in 60 tensors), and a
ClientApp replies at once with the same arrays and a ``num-examples`` metric: no data, no model, no training.
Ray runs the ClientApps with the resources ``fedprog simulate`` gives them (``simulation.num_cpus=1`` each,
and ``--ray-cpus`` for Ray as a whole, 1 as in ``simulations/scale.py``). Rounds after the first are timed.

What it prints is the floor under ``scale.py``'s "Flower + Ray" column: the part of every training message
that the framework and its transport take before any of fedprog's own work, ending with one line
``flower_floor: <nodes> nodes, <ms> ms per training message ...``.

    python simulations/flower_floor.py [--nodes 8] [--rounds 6] [--params 204548] [--tensors 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SETTINGS: dict[
    str, float
] = {}  # the command line, read by the ServerApp (run_simulation passes no run config)
ROUND_SECONDS: list[float] = []


def model_sized_arrays(n_params: int, n_tensors: int):
    """An ArrayRecord of ``n_tensors`` float32 tensors holding ``n_params`` values in all (a state dict, as
    fedprog's messages carry)."""
    import torch
    from flwr.app import ArrayRecord

    sizes = np.full(n_tensors, n_params // n_tensors)
    sizes[0] += n_params - int(sizes.sum())
    generator = torch.Generator().manual_seed(0)
    return ArrayRecord({f"w{i}": torch.randn(int(n), generator=generator) for i, n in enumerate(sizes)})


def build_apps():
    """The echoing ClientApp and the timing ServerApp."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from fedprog.federated.grid import PollingGrid

    client = ClientApp()

    @client.train()
    def echo(msg: Message, context: Context) -> Message:
        reply = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
        return Message(reply, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        arrays = model_sized_arrays(int(SETTINGS["params"]), int(SETTINGS["tensors"]))
        poll = SETTINGS["poll_ms"] / 1e3
        waiting_grid = PollingGrid(grid, poll, poll) if poll else grid  # fedprog's server wait or Flower's
        while len(node_ids := list(grid.get_node_ids())) < SETTINGS["nodes"]:
            time.sleep(0.1)
        for server_round in range(1, int(SETTINGS["rounds"]) + 1):
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
            messages = [Message(content, dst_node_id=node, message_type="train") for node in node_ids]
            started = time.perf_counter()
            replies = list(waiting_grid.send_and_receive(messages))
            ROUND_SECONDS.append(time.perf_counter() - started)
            failed = [r for r in replies if r.has_error()]
            if len(replies) != len(node_ids) or failed:
                raise RuntimeError(f"round {server_round}: {len(replies)} replies, {len(failed)} errors")
            print(
                f"round {server_round}: {len(replies)} replies in {ROUND_SECONDS[-1] * 1e3:.1f} ms",
                flush=True,
            )

    return server, client


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--params", type=int, default=204_548, help="float32 weights per message")
    parser.add_argument("--tensors", type=int, default=60)
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=0.0,
        help="pull replies every this many ms (0: Flower's send_and_receive)",
    )
    parser.add_argument(
        "--ray-cpus", type=int, default=1, help="CPUs of the local Ray (1: one ClientApp at a time)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the first round is not timed)")
    SETTINGS.update(
        nodes=args.nodes, rounds=args.rounds, params=args.params, tensors=args.tensors, poll_ms=args.poll_ms
    )
    for key in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
        os.environ.setdefault(key, "0" if key == "FLWR_TELEMETRY_ENABLED" else "1")
    from flwr.simulation import run_simulation

    server, client = build_apps()
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=args.nodes,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.ray_cpus, "include_dashboard": False},
        },
    )
    timed = np.array(ROUND_SECONDS[1:])
    if len(timed) == 0:
        print("flower_floor: no round was timed (the simulation did not run)", file=sys.stderr)
        return 1
    per_message = timed / args.nodes * 1e3
    print(
        f"flower_floor: {args.nodes} nodes, {np.median(per_message):.1f} ms per training message "
        f"(median of rounds 2-{args.rounds}; range {per_message.min():.1f}-{per_message.max():.1f}), "
        f"no-op client, {args.params:,} float32 weights in {args.tensors} tensors, Ray CPUs {args.ray_cpus}, "
        f"replies {f'polled every {args.poll_ms:g} ms' if args.poll_ms else 'by send_and_receive'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
