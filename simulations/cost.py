"""Benchmark: training cost per epoch per 100 patients, bag-reading share, peak memory (issue #3).

For bags of 512 and 4,096 patches of dimension 1,024 (CONCH/UNI-sized features), writes 100 synthetic
patients in the fedprog format to a temporary folder, trains one epoch of the SurvPath backbone with the
shared engine and reports:

- wall time of the epoch (per 100 patients),
- the share of that time spent reading bags (reading every bag once, the same work the loader does),
- peak memory of one training step on one bag (each measurement in a fresh subprocess: peak RSS minus the RSS
  before the step), and the same for a cohort 4x larger, to show memory does not grow with the cohort.

    python simulations/cost.py                      # CPU
    python simulations/cost.py training.device=cuda training.amp=true  # GPU, bf16 autocast

Absolute times are machine-specific; compare ratios measured in one run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

N_PATIENTS = 100
FEATURE_DIM = 1024
N_GENES, N_GROUPS = 300, 50
BAG_SIZES = (512, 4096)


def write_dataset(
    root: Path, n_patients: int, n_patches: int, seed: int = 0, *, linked: bool = False
) -> Path:
    """A one-cohort fedprog dataset whose bags all have ``n_patches`` x FEATURE_DIM float32 features.

    ``linked`` writes one bag and hard-links it for every patient (for memory runs that read a single bag).
    """
    rng = np.random.default_rng(seed)
    folder = root / "bench"
    (folder / "features").mkdir(parents=True, exist_ok=True)
    ids = [f"BNCH-A1-{i:04d}" for i in range(n_patients)]
    genes = [f"G{g:03d}" for g in range(N_GENES)]
    pd.DataFrame(
        {
            "case_id": ids,
            "slide_id": ids,
            "survival_months": np.round(rng.exponential(30, n_patients) + 1, 2),
            "censorship": (rng.random(n_patients) < 0.5).astype(int),
        }
    ).to_csv(folder / "labels.csv", index=False)
    expression = pd.DataFrame(rng.normal(size=(n_patients, N_GENES)), columns=genes)
    expression.insert(0, "case_id", ids)
    expression.to_csv(folder / "rna.csv", index=False)
    membership = pd.DataFrame(
        (rng.random((N_GENES, N_GROUPS)) < 0.1).astype(int), columns=[f"P{p}" for p in range(N_GROUPS)]
    )
    membership.iloc[np.arange(N_GENES), np.arange(N_GENES) % N_GROUPS] = 1
    membership.insert(0, "gene", genes)
    (root / "groups").mkdir(exist_ok=True)
    membership.to_csv(root / "groups" / "pathways.csv", index=False)
    for i, case in enumerate(ids):
        path = folder / "features" / f"{case}.pt"
        if linked and i:
            os.link(folder / "features" / f"{ids[0]}.pt", path)
        else:
            torch.save(torch.randn(n_patches, FEATURE_DIM), path)
    manifest = {
        "name": "bench",
        "cohorts": ["bench"],
        "labels": "labels.csv",
        "tables": {"rna": {"path": "rna.csv"}},
        "expression": "rna",
        "strong": "wsi",
        "features": "features",
        "groups": {"path": "groups/pathways.csv", "kind": "compositions"},
        "site_column": None,
    }
    (root / "fedprog.yaml").write_text(yaml.safe_dump(manifest))
    return root


def measure(root: str, mode: str, overrides: list[str]) -> dict:
    """In a fresh process: ``epoch`` (time an epoch and the bag reads) or ``step`` (peak RSS of a step)."""
    from fedprog.config import load_config
    from fedprog.data import DatasetLayout, load_cohorts
    from fedprog.engine import TrainConfig, resolve_device, train
    from fedprog.pipeline import build_model, fit_preprocessing, make_dataset

    cfg = load_config("train", ["data=folder", f"data.root={root}", "model=survpath", *overrides])
    layout = DatasetLayout.load(cfg.data)
    cohort = load_cohorts(layout)["bench"]
    prep = fit_preprocessing(layout, {"bench": cohort}, {"bench": cohort.case_ids}, n_bins=4)
    ids = cohort.case_ids if mode == "epoch" else cohort.case_ids[:1]
    data = make_dataset(cohort, ids, prep, max_patches=cfg.training.max_patches)
    device = resolve_device(cfg.training.device)
    model = build_model(cfg.model, data, loss="nll").to(device)
    train_cfg = TrainConfig.from_cfg(cfg.training, epochs=1, select_on="last", balanced_sampling=False)
    if mode == "step":
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        train(model, data, train_cfg, device=device, progress=False)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        return {"step_peak_mb": (peak - rss_before) / 1024, "cuda_peak_mb": cuda_peak}
    started = time.perf_counter()
    data.train()
    for i in range(len(data)):
        data[i]
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    train(model, data, train_cfg, device=device, progress=False)
    epoch_seconds = time.perf_counter() - started
    return {
        "epoch_seconds_per_100": epoch_seconds * 100 / len(data),
        "read_share": read_seconds / epoch_seconds,
    }


def run_child(root: Path, mode: str, overrides: list[str]) -> dict:
    """Run :func:`measure` in a subprocess so each peak-memory figure starts from a clean process."""
    command = [sys.executable, __file__, "--child", str(root), mode, *overrides]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(overrides: list[str]) -> int:
    """Print the cost table for every bag size."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_patches in BAG_SIZES:
            small = write_dataset(Path(tmp) / f"n{n_patches}", N_PATIENTS, n_patches)
            large = write_dataset(Path(tmp) / f"n{n_patches}x4", 4 * N_PATIENTS, n_patches, linked=True)
            row = {"patches": n_patches, **run_child(small, "epoch", overrides)}
            row.update(run_child(small, "step", overrides))
            row["step_peak_mb_4x_cohort"] = run_child(large, "step", overrides)["step_peak_mb"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    from fedprog.report import markdown_table

    print(f"\n## Training cost, SurvPath, bags of dim {FEATURE_DIM}, overrides {overrides or 'none'}\n")
    print(markdown_table(frame))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(2)
        print(json.dumps(measure(sys.argv[2], sys.argv[3], sys.argv[4:])))
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))
