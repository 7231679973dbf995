"""``fedprog simulate rotation=loco``: a federated leave-one-cancer-out rotation in one command.

One federation per (target, seed): the target cancer's sites are held out (``heldout=[<target>]``,
``seed=<seed>``), each a normal ``fedprog simulate`` run in ``<out>/folds/<target>-s<seed>/`` (results.json,
rounds.csv, checkpoints, final weights). A fold whose results.json says ``completed`` is not run again when
the same ``out=`` is given, and a fold stopped mid-way resumes from its last checkpoint, so a long rotation
can be continued. After all folds, ``<out>`` gets the ``rotation.json`` + ``predictions.csv.gz`` of
:func:`fedprog.compare.write_rotation` (the same files as ``fedprog train rotation=loco``, so
``fedprog compare <simulate rotation> <train rotation>`` pairs federated and centralized on the same targets,
seeds and patients) and a report.md table.

With ``rotation.select`` (``key``, ``values``, ``val_fraction``) each fold runs one federation per candidate
value of one config key (``<fold>/<key>=<value>/``), every training site holding back ``val_fraction`` of its
cases as a validation split (``federation.val_fraction``, drawn with the fold's seed); the candidate with the
best event-weighted source-validation C-index in its last round is the fold's model, as the Coxnet reference
chooses its penalty on the sources' validation split. No target case takes part in the choice.

With ``rotation.keep_round=best`` every training site holds back ``rotation.round_val_fraction`` of its cases
the same way, and the fold's model is the global model of the round with the best event-weighted
source-validation C-index (its checkpoint), as ``fedprog train`` chooses its epoch; ``last`` (the default)
keeps the final round's model. A ``best`` rotation also writes ``<out>/last_round/``: the same folds' final
models as a rotation of their own, so ``fedprog compare <out>/last_round <out>`` pairs the two choices on the
same federations.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from fedprog.compare import prediction_frame
from fedprog.config import to_container
from fedprog.data.errors import SiteError
from fedprog.data.sites import checked_val_fraction
from fedprog.federated import simulation
from fedprog.federated.checkpoint import CHECKPOINT_DIR, list_checkpoints, load_checkpoint, round_dir
from fedprog.federated.errors import SettingsError
from fedprog.federated.settings import check_run_settings
from fedprog.federated.strategy import BASELINES

log = logging.getLogger(__name__)

FOLDS_DIR = "folds"  # <out>/folds/<target>-s<seed>/: one simulate run folder per fold
LAST_ROUND_DIR = "last_round"  # keep_round=best: the same folds' final-round models as a rotation
FINAL_WEIGHTS = "final_weights.npz"
COMPLETED = "completed"
_ABSENT = object()


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
    selection(cfg)
    round_val_fraction(cfg)
    try:
        check_run_settings(cfg)
    except SettingsError as error:
        raise RotationError(str(error)) from None
    if str(cfg.strategy.name) in BASELINES:
        raise RotationError(
            f"strategy={cfg.strategy.name} with rotation=loco: the baselines keep no global model to predict "
            "the held-out patients with; the centralized rotation is `fedprog train rotation=loco`"
        )


@dataclass(frozen=True)
class Selection:
    """``rotation.select``: one config key chosen per fold among ``values`` on source validation splits."""

    key: str
    values: tuple[Any, ...]
    val_fraction: float

    def folder(self, value: Any) -> str:
        """A candidate's sub-folder of the fold: ``<key>=<value>``."""
        return f"{self.key}={value}"

    def candidate(self, cfg: DictConfig, value: Any, seed: int) -> DictConfig:
        """The fold config with ``key=value`` and every training site holding back its validation split."""
        candidate = with_validation(cfg, self.val_fraction, seed)
        OmegaConf.update(candidate, self.key, value, merge=False)
        return candidate

    def describe(self) -> str:
        """One line for reports and rotation.json."""
        return f"{self.key} in {list(self.values)} on {self.val_fraction:.0%} source validation splits"


def with_validation(cfg: DictConfig, fraction: float, seed: int) -> DictConfig:
    """A copy of ``cfg`` whose training sites hold back ``fraction`` of their cases (drawn with ``seed``)."""
    fold = OmegaConf.create(to_container(cfg))
    with open_dict(fold.federation):
        fold.federation.val_fraction = fraction
        fold.federation.val_seed = seed
    return fold


def _checked_fraction(cfg: DictConfig, value: Any, key: str) -> float:
    """A validation share in (0, 1) for ``key`` (one-line :class:`RotationError` otherwise)."""
    try:
        fraction = checked_val_fraction(value, cfg.federation.get("split_column"), key)
    except SiteError as error:
        raise RotationError(str(error)) from None
    if not fraction:
        raise RotationError(f"{key}={value!r}: choose a share in (0, 1)")
    return fraction


def round_val_fraction(cfg: DictConfig) -> float | None:
    """``rotation.keep_round``: None for ``last``; for ``best`` the validation share (checked, one line)."""
    keep = str(cfg.rotation.get("keep_round", "last"))
    if keep not in {"last", "best"}:
        raise RotationError(f"rotation.keep_round={keep!r}: choose last or best")
    if keep == "last":
        return None
    if (cfg.rotation.get("select") or {}).get("key") is not None:
        raise RotationError(
            "rotation.keep_round=best with rotation.select: choose one per rotation (select compares the "
            "candidates' last rounds)"
        )
    if int((cfg.get("checkpoint") or {}).get("keep", 0)) != 0:
        raise RotationError(
            f"rotation.keep_round=best needs every round's checkpoint: checkpoint.keep={cfg.checkpoint.keep} "
            "prunes them (set checkpoint.keep=0)"
        )
    return _checked_fraction(cfg, cfg.rotation.get("round_val_fraction"), "rotation.round_val_fraction")


def best_round(rounds: pd.DataFrame) -> dict[str, Any] | None:
    """The round of ``rounds.csv`` whose training sites' event-weighted (validation) C-index is the highest
    (the earliest on a tie), with that score and the held-out sites' C-index of the round; None when no
    round has a finite source score."""
    from fedprog.federated.outputs import role_summary

    best: dict[str, Any] | None = None
    for server_round, rows in rounds.groupby("round", sort=True):
        records = rows.to_dict("records")
        score = role_summary(records, "train")["c_index"]
        if np.isfinite(score) and (best is None or score > best["source_val_c_index"]):
            heldout = role_summary(records, "holdout")["c_index"]
            best = {"round": int(server_round), "source_val_c_index": float(score)}
            best["heldout_c_index"] = heldout
    return best


def selection(cfg: DictConfig) -> Selection | None:
    """``rotation.select`` checked (one-line :class:`RotationError`), or None when no key is given."""
    select = cfg.rotation.get("select")
    if not select or select.get("key") is None:
        return None
    key = str(select.key)
    if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
        raise RotationError(f"rotation.select.key={key!r} is not a key of the simulate config")
    values = tuple(to_container(select.get("values") or []))
    if len(values) < 2:
        raise RotationError(f"rotation.select.values={list(values)}: list two or more candidates for {key}")
    fraction = _checked_fraction(cfg, select.get("val_fraction"), "rotation.select.val_fraction")
    return Selection(key, values, fraction)


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


def run_selected_fold(
    cfg: DictConfig, target: str, seed: int, out: Path, select: Selection
) -> tuple[DictConfig, dict[str, Any], dict[str, Any]] | None:
    """Every candidate of ``select`` for one fold; the chosen one's config and results, and the choice."""
    scores: dict[str, float] = {}
    best: tuple[float, Any, DictConfig, dict[str, Any]] | None = None
    for value in select.values:
        ran = run_fold(select.candidate(cfg, value, seed), target, seed, out / select.folder(value))
        if ran is None:
            return None
        score = ran[1].get("headline", {}).get("train_c_index")
        score = float("nan") if score is None else float(score)
        scores[str(value)] = score
        log.info("fold %s: %s=%s -> source validation C-index %.3f", out.name, select.key, value, score)
        if np.isfinite(score) and (best is None or score > best[0]):
            best = (score, value, *ran)
    if best is None:
        print(
            f"fedprog simulate: fold {out.name}: no candidate of {select.key} has a source validation "
            "C-index (every training site's validation split lacks a comparable pair)",
            file=sys.stderr,
        )
        return None
    _, value, prepared, results = best
    choice = {"key": select.key, "value": value, "source_val_c_index": scores}
    return prepared, results, choice


def heldout_predictions(
    cfg: DictConfig, target: str, seed: int, server_round: int | None = None
) -> pd.DataFrame:
    """SIMULATION ONLY: per-patient risks of a finished fold's held-out sites, computed on this machine.

    The fold's final global model (``final_weights.npz``; with ``server_round``, that round's checkpointed
    global model); :func:`heldout_predictions_of_rounds` for one round.
    """
    return heldout_predictions_of_rounds(cfg, target, seed, [server_round])[0]


def heldout_predictions_of_rounds(
    cfg: DictConfig, target: str, seed: int, server_rounds: Sequence[int | None]
) -> list[pd.DataFrame]:
    """SIMULATION ONLY: per-patient held-out risks of several global models of one finished fold.

    For each of ``server_rounds`` (None: the final model, ``final_weights.npz``; a round: its checkpointed
    global model), the model and the preprocessing the federation fitted (in its checkpoint) are evaluated
    with the clients' own code (:func:`client_app.site_dataset`, standardized by each site's own cases, and
    :func:`client_app.evaluate_model`) on exactly each held-out site's evaluation cases: the same numbers the
    sites computed, whose aggregates they reported in rounds.csv. The sites' datasets are built once. Only
    possible in simulation, where the researcher owns all the simulated data; no site ever sends these values.
    """
    from fedprog.data import DatasetLayout, build_sites, load_cohort
    from fedprog.engine import resolve_device
    from fedprog.federated.client_app import eval_ids, evaluate_model, site_dataset
    from fedprog.federated.strategy import numpy_to_arrays
    from fedprog.pipeline import Preprocessing

    out = Path(str(cfg.out))
    last = load_checkpoint(list_checkpoints(out / CHECKPOINT_DIR)[-1])
    prep = Preprocessing.from_state_dict(last.federation["prep"])  # fitted once, before round 1
    layout = DatasetLayout.load(to_container(cfg.data))
    cohort = load_cohort(layout, target)
    sites = [s for s in build_sites(layout, cfg.federation, list(cfg.heldout)) if s.role == "holdout"]
    datasets = {site.name: site_dataset(cfg, cohort, site, eval_ids(site), prep) for site in sites}
    device = str(resolve_device(str(cfg.training.device)))
    predictions = []
    for server_round in server_rounds:
        if server_round is None:
            with np.load(out / FINAL_WEIGHTS) as weights:
                arrays = numpy_to_arrays({key: weights[key] for key in weights.files})
        else:
            arrays = numpy_to_arrays(load_checkpoint(round_dir(out / CHECKPOINT_DIR, server_round)).arrays)
        frames = []
        for name, data in datasets.items():
            result = evaluate_model(cfg, data, arrays, device)
            frames.append(
                prediction_frame(
                    target, seed, name, result.case_ids, result.time, result.censorship, result.risk
                )
            )
        predictions.append(pd.concat(frames, ignore_index=True))
    return predictions


def fold_run(
    cfg: DictConfig, target: str, seed: int, out: Path, select: Selection | None
) -> tuple[DictConfig, dict[str, Any], Path, dict[str, Any] | None] | None:
    """One fold: (config, results, run folder, choice) of its run in ``out``, or of the candidate ``select``
    chose (``folds/<target>-s<seed>/<key>=<value>/``); None when it did not complete."""
    if select is None:
        ran = run_fold(cfg, target, seed, out)
        return None if ran is None else (*ran, out, None)
    selected = run_selected_fold(cfg, target, seed, out, select)
    if selected is None:
        return None
    prepared, results, choice = selected
    return prepared, results, out / select.folder(choice["value"]), choice


def run_folds(
    cfg: DictConfig, out: Path, targets: list[str], seeds: list[int]
) -> list[dict[str, Any]] | None:
    """Every fold in turn (one progress line each); per fold its predictions and record, None on a failure."""
    from fedprog.survival.stats import cindex

    folds = [(target, seed) for target in targets for seed in seeds]
    select, fraction = selection(cfg), round_val_fraction(cfg)
    done: list[dict[str, Any]] = []
    for i, (target, seed) in enumerate(folds, 1):
        fold_out = out / FOLDS_DIR / fold_name(target, seed)
        started = time.monotonic()
        fold_cfg = cfg if fraction is None else with_validation(cfg, fraction, seed)
        ran = fold_run(fold_cfg, target, seed, fold_out, select)
        problem, kept = ("", None) if ran is None else _round_to_keep(fold_cfg, ran, select, fraction)
        if problem is not None:
            print(
                f"fedprog simulate: rotation stopped at fold {i}/{len(folds)} ({target} seed {seed}, "
                f"{fold_out}){problem or f'; give out={out} again to continue'}",
                file=sys.stderr,
            )
            return None
        prepared, results, folder, choice = ran
        rounds = (
            [None] if kept is None else [kept["round"], None]
        )  # best: also the final model, for last_round/
        predictions, *last_round = heldout_predictions_of_rounds(prepared, target, seed, rounds)
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
        record: dict[str, Any] = {
            "target": target,
            "seed": seed,
            "folder": str(folder.relative_to(out)),
            "c_index": c_index,
        }
        if choice is not None:
            record["selected"] = choice
        if kept is not None:
            record["kept_round"] = kept
        record["federation_heldout_c_index"] = (
            results.get("headline", {}).get("heldout_c_index") if kept is None else kept["heldout_c_index"]
        )
        item = {"record": record, "predictions": predictions, "cfg": prepared}
        if last_round:  # the same federation's final model, for the paired last-vs-best comparison
            item["last_round_predictions"] = last_round[0]
        done.append(item)
    return done


def _round_to_keep(
    fold_cfg: DictConfig,
    ran: tuple[DictConfig, Any, Path, Any],
    select: Selection | None,
    fraction: float | None,
) -> tuple[str | None, dict[str, Any] | None]:
    """(why the fold cannot be used or None, the kept round of ``rotation.keep_round=best`` or None)."""
    prepared, _, folder, _ = ran
    mismatch = None if select else _split_mismatch(fold_cfg, prepared)
    if mismatch or fraction is None:
        return mismatch, None
    kept = best_round(pd.read_csv(folder / "rounds.csv"))
    return (None, kept) if kept is not None else (": no round has a source validation C-index", None)


def _split_mismatch(asked: DictConfig, ran: DictConfig) -> str | None:
    """Why a fold folder run before (the same ``out=``) cannot serve this rotation: it held back another
    validation split than this rotation's ``rotation.keep_round`` asks; None when they agree."""
    want = float(asked.federation.get("val_fraction") or 0)
    got = float(ran.federation.get("val_fraction") or 0)
    if want == got:
        return None
    return (
        f": that fold ran with federation.val_fraction={got:g} and this rotation "
        f"(rotation.keep_round={asked.rotation.get('keep_round', 'last')}) needs {want:g}; give a new out="
    )


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
        **({"select": select.describe()} if (select := selection(cfg)) else {}),
        **({"keep_round": _kept_round_text(fraction)} if (fraction := round_val_fraction(cfg)) else {}),
    }


def _kept_round_text(fraction: float) -> str:
    """``rotation.keep_round=best`` in words, for rotation.json and the report."""
    return f"the round with the best source validation C-index on {fraction:.0%} validation splits"


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
    truth = layout_truth(DatasetLayout.load(to_container(first.data)))
    summary = write_rotation(
        out,
        setting(cfg, targets),
        predictions,
        truth=truth,
        n_boot=int(cfg.rotation.n_boot),
        level=float(cfg.rotation.level),
        extra={"federation_folds": records},
    )
    if "last_round_predictions" in folds[0]:
        last = setting(cfg, targets)
        last.pop("keep_round")
        last["label"] = f"{last['label']} (last round)"
        (out / LAST_ROUND_DIR).mkdir(exist_ok=True)
        write_rotation(
            out / LAST_ROUND_DIR,
            last,
            pd.concat([f["last_round_predictions"] for f in folds], ignore_index=True),
            truth=truth,
            n_boot=int(cfg.rotation.n_boot),
            level=float(cfg.rotation.level),
        )
    report = ReportBuilder(out, "fedprog federated leave-one-cancer-out rotation")
    report.section(
        "Rotation",
        f"One federation per held-out cancer and seed ({cfg.strategy.name}, {cfg.rounds} rounds), each in "
        f"`{FOLDS_DIR}/<target>-s<seed>/`"
        + (f"; per fold {select.describe()}" if (select := selection(cfg)) else "")
        + ". Held-out predictions recomputed from each fold's "
        + (
            f"global model of {_kept_round_text(fraction)} (the final models of the same federations: "
            f"`{LAST_ROUND_DIR}/`, paired by `fedprog compare {LAST_ROUND_DIR} .`)"
            if (fraction := round_val_fraction(cfg))
            else "final global model"
        )
        + " on the researcher's machine (simulation only). C-index: Harrell's, mean over seeds, "
        f"{float(cfg.rotation.level):.0%} bootstrap CI (patients within sites, then seeds).",
    )
    columns = ["target", "c_index", "ci_low", "ci_high", "transfer_c_index", "oracle_c_index", "chance"]
    report.table("Leave-one-cancer-out (federated)", summary[[*columns, "n_seeds", "n_events", "few_events"]])
    report.table("Folds", pd.DataFrame([_fold_row(r) for r in records]))
    report.write()
    return summary


def _fold_row(record: dict[str, Any]) -> dict[str, Any]:
    """A fold record as a flat table row: the chosen value and every candidate's validation C-index."""
    row = {k: v for k, v in record.items() if k not in {"selected", "kept_round"}}
    kept = record.get("kept_round")
    if kept:
        row["round"], row["source val C"] = kept["round"], kept["source_val_c_index"]
    choice = record.get("selected")
    if choice:
        row[choice["key"]] = choice["value"]
        row.update({f"val {value}": score for value, score in choice["source_val_c_index"].items()})
    return row


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
