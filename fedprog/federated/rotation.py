"""``fedprog simulate rotation=loco``: a federated leave-one-cancer-out rotation in one command.

One federation per (target, seed): the target cancer's sites are held out (``heldout=[<target>]``,
``seed=<seed>``), each a normal ``fedprog simulate`` run in ``<out>/folds/<target>-s<seed>/`` (results.json,
rounds.csv, checkpoints, final weights). A fold whose results.json says ``completed`` is not run again when
the same ``out=`` is given, and a fold stopped mid-way resumes from its last checkpoint, so a long rotation
can be continued. After all folds, ``<out>`` gets the ``rotation.json`` + ``predictions.csv.gz`` of
:func:`fedprog.compare.write_rotation` (the same files as ``fedprog train rotation=loco``, so
``fedprog compare <simulate rotation> <train rotation>`` pairs federated and centralized on the same targets,
seeds and patients) and a report.md table.

SIMULATION ONLY: the patient-level held-out predictions are computed on the researcher's machine, which owns
all simulated data, by evaluating each fold's final global model with the clients' own code
(:func:`heldout_predictions`). In a deployment no patient-level value ever leaves a site.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fedprog.compare import prediction_frame
from fedprog.config import to_container
from fedprog.federated import simulation
from fedprog.federated.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint
from fedprog.federated.strategy import BASELINES

log = logging.getLogger(__name__)

FOLDS_DIR = "folds"  # <out>/folds/<target>-s<seed>/: one simulate run folder per fold
FINAL_WEIGHTS = "final_weights.npz"
COMPLETED = "completed"


class RotationError(ValueError):
    """A rotation setting that cannot run; the message is one line naming the key."""


def fold_name(target: str, seed: int) -> str:
    """The fold's sub-folder name under ``<out>/folds/``."""
    return f"{target}-s{seed}"


def rotation_cohorts(cfg: DictConfig) -> list[str]:
    """The cohorts the federation's sites hold (generating the synthetic default first when missing)."""
    from fedprog.data import build_sites
    from fedprog.protocol import prepare_layout

    sites = build_sites(prepare_layout(cfg.data), cfg.federation)
    return list(dict.fromkeys(site.cohort for site in sites))


def check_settings(cfg: DictConfig) -> None:
    """:class:`RotationError` (one line) for settings that cannot rotate; checked before any data is read."""
    default_heldout = OmegaConf.load(_simulate_yaml()).heldout
    if str(cfg.rotation.mode) != "loco":
        raise RotationError(f"rotation.mode={cfg.rotation.mode!r}: choose none or loco")
    if cfg.get("resume"):
        raise RotationError(
            f"resume={cfg.resume} with rotation=loco: give the rotation's out= again instead "
            "(completed folds are skipped, a stopped fold resumes from its checkpoint)"
        )
    if cfg.get("heldout") is None or list(cfg.heldout) != list(default_heldout):
        raise RotationError(
            f"heldout={_text(cfg.get('heldout'))} with rotation=loco: each fold holds out its target cancer; "
            "drop heldout= and choose the cancers with rotation.targets"
        )
    if str(cfg.strategy.name) in BASELINES:
        raise RotationError(
            f"strategy={cfg.strategy.name} with rotation=loco: the baselines keep no global model to predict "
            "the held-out patients with; the centralized rotation is `fedprog train rotation=loco`"
        )


def targets_and_seeds(cfg: DictConfig, cohorts: list[str]) -> tuple[list[str], list[int]]:
    """(targets, seeds) of the rotation; :class:`RotationError` names a target that is not a cohort."""
    rotation = cfg.rotation
    if len(cohorts) < 2:
        raise RotationError(f"rotation=loco needs two or more cohorts, the federation has {cohorts}")
    targets = [str(t) for t in rotation.targets] if rotation.targets is not None else list(cohorts)
    for target in targets:
        if target not in cohorts:
            near = difflib.get_close_matches(target, cohorts, n=1, cutoff=0.0)
            raise RotationError(
                f"rotation.targets: {target!r} is not a cohort of the dataset (nearest: {near[0]!r}; "
                f"cohorts: {', '.join(cohorts)})"
            )
    seeds = [int(s) for s in rotation.seeds] if rotation.seeds is not None else [int(cfg.seed)]
    return targets, seeds


def _simulate_yaml() -> Path:
    from fedprog.config import config_dir

    return config_dir() / "simulate.yaml"


def _text(value: Any) -> str:
    return json.dumps(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def fold_config(cfg: DictConfig, target: str, seed: int, out: Path) -> DictConfig:
    """The plain ``fedprog simulate`` config of one fold: ``heldout=[target]``, ``seed``, ``out`` its folder.

    A fold folder holding checkpoints of a run that did not complete is resumed from its last checkpoint.
    """
    fold = OmegaConf.create(to_container(cfg))
    fold.heldout = [target]
    fold.seed = seed
    fold.out = str(out)
    fold.rotation.mode = "none"
    fold.resume = str(out) if list_checkpoints(out / CHECKPOINT_DIR) else None
    return fold


def completed_results(out: Path) -> dict[str, Any] | None:
    """results.json of a fold folder when its run completed, else None."""
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if results.get("status") == COMPLETED else None


def run_fold(cfg: DictConfig, target: str, seed: int, out: Path) -> tuple[DictConfig, dict[str, Any]] | None:
    """Run (or skip, when completed) one fold; its prepared config and results, or None when it failed."""
    done = completed_results(out)
    if done is not None:
        log.info("fold %s: completed before, not run again", out.name)
        saved = OmegaConf.load(out / "config.yaml")  # the resolved config the fold ran with
        assert isinstance(saved, DictConfig)
        return saved, done
    prepared = simulation.start(fold_config(cfg, target, seed, out))
    if prepared is None:
        return None
    results = simulation.execute(prepared)
    if results is None or results.get("status") != COMPLETED:
        return None
    return prepared, results


def heldout_predictions(cfg: DictConfig, target: str, seed: int) -> pd.DataFrame:
    """SIMULATION ONLY: per-patient risks of a finished fold's held-out sites, computed on this machine.

    The fold's final global model (``final_weights.npz``) and the preprocessing the federation fitted (in its
    checkpoint) are evaluated with the clients' own code (:func:`client_app.site_dataset`, standardized by
    each site's own cases, and :func:`client_app.evaluate_model`) on exactly each held-out site's evaluation
    cases: the same numbers the sites computed, whose aggregates they reported in rounds.csv. Only possible in
    simulation, where the researcher owns all the simulated data; no site ever sends these values.
    """
    from fedprog.data import DatasetLayout, build_sites, load_cohort
    from fedprog.engine import resolve_device
    from fedprog.federated.client_app import eval_ids, evaluate_model, site_dataset
    from fedprog.federated.strategy import numpy_to_arrays
    from fedprog.pipeline import Preprocessing

    out = Path(str(cfg.out))
    checkpoint = load_checkpoint(list_checkpoints(out / CHECKPOINT_DIR)[-1])
    prep = Preprocessing.from_state_dict(checkpoint.federation["prep"])
    with np.load(out / FINAL_WEIGHTS) as weights:
        arrays = numpy_to_arrays({key: weights[key] for key in weights.files})
    layout = DatasetLayout.load(to_container(cfg.data))
    sites = build_sites(layout, cfg.federation, list(cfg.heldout))
    cohort = load_cohort(layout, target)
    device = str(resolve_device(str(cfg.training.device)))
    frames = []
    for site in (s for s in sites if s.role == "holdout"):
        data = site_dataset(cfg, cohort, site, eval_ids(site), prep)
        result = evaluate_model(cfg, data, arrays, device)
        frames.append(
            prediction_frame(
                target, seed, site.name, result.case_ids, result.time, result.censorship, result.risk
            )
        )
    return pd.concat(frames, ignore_index=True)


def run_folds(
    cfg: DictConfig, out: Path, targets: list[str], seeds: list[int]
) -> list[dict[str, Any]] | None:
    """Every fold in turn (one progress line each); per fold its predictions and record, None on a failure."""
    from fedprog.survival.stats import cindex

    folds = [(target, seed) for target in targets for seed in seeds]
    done: list[dict[str, Any]] = []
    for i, (target, seed) in enumerate(folds, 1):
        fold_out = out / FOLDS_DIR / fold_name(target, seed)
        started = time.monotonic()
        ran = run_fold(cfg, target, seed, fold_out)
        if ran is None:
            print(
                f"fedprog simulate: rotation stopped at fold {i}/{len(folds)} ({target} seed {seed}, "
                f"{fold_out}); give out={out} again to continue",
                file=sys.stderr,
            )
            return None
        prepared, results = ran
        predictions = heldout_predictions(prepared, target, seed)
        c_index = cindex(*(predictions[k].to_numpy(float) for k in ("time", "censorship", "risk")))
        seconds = time.monotonic() - started
        log.info(
            "fold %d/%d: %s seed %d -> held-out C-index %.2f (%.0f s)",
            i,
            len(folds),
            target,
            seed,
            c_index,
            seconds,
        )
        record = {
            "target": target,
            "seed": seed,
            "folder": str(fold_out.relative_to(out)),
            "c_index": c_index,
        }
        record["federation_heldout_c_index"] = results.get("headline", {}).get("heldout_c_index")
        done.append({"record": record, "predictions": predictions, "cfg": prepared})
    return done


def setting(cfg: DictConfig, targets: list[str]) -> dict[str, Any]:
    """What the rotation ran, for rotation.json (``label`` names it in ``fedprog compare``)."""
    from fedprog.protocol import modules_label

    modules = modules_label(cfg.model)
    return {
        "label": str(cfg.label) if cfg.get("label") else f"{cfg.strategy.name}+{cfg.model.name}+{modules}",
        "command": "simulate",
        "strategy": str(cfg.strategy.name),
        "model": str(cfg.model.name),
        "modules": modules,
        "rotation": str(cfg.rotation.mode),
        "targets": targets,
        "rounds": int(cfg.rounds),
        "federation": str(cfg.federation.get("name") or ""),
        "privacy": str(cfg.privacy.get("mode", "none")) if cfg.get("privacy") else "none",
    }


def write_outputs(
    cfg: DictConfig, out: Path, folds: list[dict[str, Any]], targets: list[str]
) -> pd.DataFrame:
    """rotation.json + predictions.csv.gz (:func:`fedprog.compare.write_rotation`) and report.md."""
    from fedprog.compare import write_rotation
    from fedprog.data import DatasetLayout
    from fedprog.protocol import layout_truth
    from fedprog.report import ReportBuilder

    first = folds[0]["cfg"]
    predictions = pd.concat([f["predictions"] for f in folds], ignore_index=True)
    records = [f["record"] for f in folds]
    summary = write_rotation(
        out,
        setting(cfg, targets),
        predictions,
        truth=layout_truth(DatasetLayout.load(to_container(first.data))),
        n_boot=int(cfg.rotation.n_boot),
        level=float(cfg.rotation.level),
        extra={"federation_folds": records},
    )
    report = ReportBuilder(out, "fedprog federated leave-one-cancer-out rotation")
    report.section(
        "Rotation",
        f"One federation per held-out cancer and seed ({cfg.strategy.name}, {cfg.rounds} rounds), each in "
        f"`{FOLDS_DIR}/<target>-s<seed>/`. Held-out predictions recomputed from each fold's final global "
        "model on the researcher's machine (simulation only). C-index: Harrell's, mean over seeds, "
        f"{float(cfg.rotation.level):.0%} bootstrap CI (patients within sites, then seeds).",
    )
    columns = ["target", "c_index", "ci_low", "ci_high", "transfer_c_index", "oracle_c_index", "chance"]
    report.table("Leave-one-cancer-out (federated)", summary[[*columns, "n_seeds", "n_events", "few_events"]])
    report.table("Folds", pd.DataFrame(records))
    report.write()
    return summary


def main(cfg: DictConfig) -> int:
    """``fedprog simulate rotation=loco``: validate, run every fold, write rotation.json and report.md."""
    from fedprog.data import CohortError
    from fedprog.results import run_folder

    cfg = OmegaConf.create(to_container(cfg))
    try:
        cfg.data.root = str(Path(str(cfg.data.root)).resolve())
        simulation.ray_init_args(cfg.simulation)
        check_settings(cfg)
        targets, seeds = targets_and_seeds(cfg, rotation_cohorts(cfg))
    except (RotationError, CohortError, simulation.RayAddressError, OSError) as error:
        print(f"fedprog simulate: error: {' | '.join(str(error).splitlines())}", file=sys.stderr)
        return 2
    out = run_folder("simulate", cfg.out)
    log.info("rotation over %s x seeds %s -> %s", targets, seeds, out)
    folds = run_folds(cfg, out, targets, seeds)
    if folds is None:
        return 1
    summary = write_outputs(cfg, out, folds, targets)
    print(summary.to_string(index=False, float_format="%.3f"))
    print(f"\nrotation: {out / 'rotation.json'}\nreport:   {out / 'report.md'}")
    return 0
