"""Cost of the style CADE (issue 10): a training step with CADE versus the same step without it.

One SurvPath model at the default width (D = 256, ``configs/model/survpath.yaml`` otherwise), one patient per
step as the engine trains (batch size 1, a bag of ``N_PATCHES`` x ``FEATURE_DIM`` features, 331 pathway
groups), an optimizer step included. The same model alternates between with and without CADE (the module is
detached for the "without" steps; it has no weights), in ABBA order over ``REPEATS`` rounds so that drift in
machine load hits both alike; the ratio of the medians of the process CPU time is printed (CPU time is
robust to other processes sharing the cores; the wall-clock ratio is printed beside it). On a loaded machine
the step ratio is noisy (a few %), so CADE's own forward + backward on the step's tokens is also timed alone
and given as a share of the step without it: an upper bound that does not depend on the noise of two steps.
CADE is forced to fire on every step
(``p_aug = 1``, the worst case; the default ``p_aug = 0.3`` costs less), its running bank full (64 patients)
and ``mode`` as configured (``mix``; ``mix_dsu`` is timed too).

    python simulations/module_cost.py

prints ``module_cost: <mode> step ratio <r>`` lines; issue 10's target is r <= 1.15.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from fedprog.models import create_model
from fedprog.survival.losses import nll_survival_loss

N_PATCHES = 2048
FEATURE_DIM = 1024
REPEATS = 10
WARMUP = 2


@dataclass
class Batch:
    """The fields of :class:`fedprog.data.Batch` that the model and the loss read."""

    expression: torch.Tensor
    strong: torch.Tensor
    strong_mask: torch.Tensor
    bins: torch.Tensor
    censorship: torch.Tensor


def make_batch(n_genes: int) -> Batch:
    """One patient: a bag of N_PATCHES x FEATURE_DIM features and an expression profile."""
    return Batch(
        expression=torch.randn(1, n_genes),
        strong=torch.randn(1, N_PATCHES, FEATURE_DIM),
        strong_mask=torch.ones(1, N_PATCHES, dtype=torch.bool),
        bins=torch.tensor([1]),
        censorship=torch.tensor([0.0]),
    )


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one training step (forward, loss, backward, update)."""
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = nll_survival_loss(model(batch), batch.bins, batch.censorship)
    loss.backward()
    optimizer.step()
    return time.process_time() - start_cpu, time.perf_counter() - start_wall


def module_alone(cade: torch.nn.Module, dim: int, n_groups: int) -> float:
    """Median CPU seconds of CADE's forward + backward alone on one step's tokens."""
    strong = torch.randn(1, N_PATCHES, dim, requires_grad=True)
    weak = torch.randn(1, n_groups, dim, requires_grad=True)
    seconds = []
    for _ in range(REPEATS):
        start = time.process_time()
        out_strong, out_weak = cade(strong, weak)
        (out_strong.sum() + out_weak.sum()).backward()
        seconds.append(time.process_time() - start)
    return statistics.median(seconds)


def ratio(mode: str, groups: list[list[int]], batch: Batch) -> dict[str, tuple[float, float]]:
    """``{"cpu" | "wall": (median seconds without CADE, with CADE), "alone": (CADE alone, 0)}``."""
    torch.manual_seed(0)
    cfg = OmegaConf.load("configs/model/survpath.yaml")
    cfg.cade.enabled, cfg.cade.p_aug, cfg.cade.mode = True, 1.0, mode
    model = create_model(cfg, group_index=groups, strong_kind="wsi", strong_dim=FEATURE_DIM, n_outputs=4)
    model.train()
    cade = model.cade
    for _ in range(cade.bank_size):  # a full bank, as after the first 64 patients
        cade(torch.randn(1, 8, cfg.dim), torch.randn(1, 8, cfg.dim))
    optimizer = torch.optim.RAdam(model.parameters(), lr=5e-4, weight_decay=1e-3)
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for repeat in range(WARMUP + REPEATS):
        order = (True, False) if repeat % 2 == 0 else (False, True)
        for with_cade in order:
            model.cade = cade if with_cade else None
            seconds = step(model, optimizer, batch)
            if repeat >= WARMUP:
                times[with_cade].append(seconds)
    medians = {
        clock: (
            statistics.median(t[i] for t in times[False]),
            statistics.median(t[i] for t in times[True]),
        )
        for i, clock in enumerate(("cpu", "wall"))
    }
    return medians | {"alone": (module_alone(cade, cfg.dim, len(groups)), 0.0)}


def main() -> None:
    """Print the medians and the ``module_cost`` lines."""
    torch.set_num_threads(2)
    groups = [list(range(i * 20, i * 20 + 5 + i % 30)) for i in range(331)]
    batch = make_batch(max(max(g) for g in groups) + 1)
    print(
        f"SurvPath D=256, batch size 1, bag {N_PATCHES} x {FEATURE_DIM}, 331 groups; {REPEATS} ABBA repeats"
    )
    for mode in ("mix", "mix_dsu"):
        medians = ratio(mode, groups, batch)
        alone = medians.pop("alone")[0]
        for clock, (without, with_) in medians.items():
            print(f"  {clock:>4}: without CADE {without * 1e3:8.1f} ms, with ({mode}) {with_ * 1e3:8.1f} ms")
        (cpu_without, cpu_with), (wall_without, wall_with) = medians["cpu"], medians["wall"]
        print(
            f"module_cost: {mode} step ratio {cpu_with / cpu_without:.3f} (process CPU time; "
            f"wall {wall_with / wall_without:.3f}; CADE alone {alone * 1e3:.1f} ms = "
            f"{alone / cpu_without:.3f} of a step, bound {1 + alone / cpu_without:.3f})"
        )


if __name__ == "__main__":
    main()
