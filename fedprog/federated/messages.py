"""The federation's wire protocol: action names, record keys, error text, and validated (untrusted) replies.

Both the ClientApp and the ServerApp import their keys from here. Everything a site sends is untrusted on
the server: :func:`parse_describe`, :func:`check_update`, :func:`check_train_metrics` and
:func:`check_eval_metrics` turn a reply into checked values or raise :class:`ReplyError` with a one-line
reason, so a bad reply rejects that site's update (or marks the site failed) and never crashes the run. Errors
leaving a site travel as :func:`encode_error` JSON (site, error class, sanitized one-line reason, no
traceback).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from omegaconf import DictConfig

from fedprog.data.sites import ROLES

# ------------------------------------------------------------------------------------------------ keys
CFG_PREFIX = (
    "fedprog."  # resolved-config keys inside a ConfigRecord (never "privacy.*": privacy mods read those)
)
PREP_KEY = "fedprog-prep"  # JSON of Preprocessing.state_dict()
ACTION_KEY = "fedprog-action"  # query action: DESCRIBE | FIT_STATS
GENES_KEY = "fedprog-genes"  # fit-stats: JSON of the server's gene groups; empty: no expression
KM_GRID_KEY = "km-grid"  # evaluate: when present, the site adds aggregate KM curves of its risk groups
STYLE_KEY = "fedprog-style"  # train reply ConfigRecord: the site's aggregate CADE style summaries (optional)
STYLE_BANK_KEY = "fedprog-style-bank"  # train message ConfigRecord: other sites' pooled style summaries
DESCRIBE = "describe"
FIT_STATS = "fit-stats"
ACTIONS = (DESCRIBE, FIT_STATS)

#: Every metric key a reply may carry (tests check replies against this allow-list).
TRAIN_METRICS = ("num-examples", "n-events", "train-loss", "n-steps", "seconds")
KM_METRICS = ("km-grid", "km-low", "km-high", "km-n-low", "km-n-high", "km-events-low", "km-events-high")
EVAL_METRICS = (
    "num-examples",
    "n-events",
    "c-index",
    "c-index-ipcw",
    "ibs",
    "mean-auc",
    "logrank-p",
    "loss",
    "missing-genes",
    *KM_METRICS,
)
DESCRIBE_METRICS = ("n-cases", "n-events", "n-train-cases", "strong-dim")
FIT_METRICS = ("expr-count", "expr-sum", "expr-sumsq", "event-hist")
#: Style summary records: ``"<modality>.<field>"`` keys; ``count`` an integer, the rest ``model.dim`` floats.
STYLE_MODALITIES = ("strong", "weak")
STYLE_VECTORS = ("mu_mean", "mu_var", "log_sigma_mean", "log_sigma_var")
STYLE_FIELDS = ("count", *STYLE_VECTORS)

#: Metrics that must lie in [0, 1] (or be NaN: undefined on that site).
UNIT_METRICS = ("c-index", "c-index-ipcw", "ibs", "mean-auc", "logrank-p")
SITE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_REASON = 200


def config_record(cfg: DictConfig, **extra: Any) -> ConfigRecord:
    """The resolved config as a ConfigRecord (``fedprog.<dotted key>``) plus ``extra`` entries."""
    from fedprog.config import to_run_config

    flat = {CFG_PREFIX + key: value for key, value in to_run_config(cfg).items()}
    return ConfigRecord({**flat, **extra})


class ReplyError(ValueError):
    """A site's reply breaks the protocol; the message is the one-line reason recorded for that site."""


# ------------------------------------------------------------------------------------------------ names
def check_site_name(name: Any) -> str:
    """``name`` when it is a safe site name ([A-Za-z0-9_.-], at most 64, no ``..``), else ReplyError."""
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name) or ".." in name or name.startswith("."):
        raise ReplyError(f"site name {str(name)[:40]!r} is not a safe name ([A-Za-z0-9_.-], no '..')")
    return name


# ------------------------------------------------------------------------------------------------ errors
_ABS_PATH = re.compile(r"(?<![\w.~-])(?:~|[A-Za-z]:)?[/\\][^\s'\",:;)\]]*")


def sanitize(text: str, *, secrets: Iterable[str] = ()) -> str:
    """One line of ``text`` without traceback, absolute paths (kept as their last part) or ``secrets``.

    ``secrets`` are strings to mask as ``<case>`` (a site passes its case ids).
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]  # the exception line of a traceback
    line = " | ".join(lines)
    line = _ABS_PATH.sub(_last_part, line)
    for secret in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        line = line.replace(secret, "<case>")
    line = _BARCODE.sub("<case>", line)  # TCGA-like patient barcodes the site did not list
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 3] + "..."


_BARCODE = re.compile(r"\b[A-Z0-9]{4}-[A-Z0-9]{2}-[A-Z0-9]{4}\b")


def _last_part(match: re.Match[str]) -> str:
    """An absolute path's last component (the file name), never the folders that lead to it."""
    return match.group(0).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "/"


@dataclass(frozen=True)
class SiteError:
    """An error a site reported: which site (as it claims), the error class and a sanitized reason."""

    site: str | None
    error_class: str
    reason: str

    def __str__(self) -> str:
        return f"{self.error_class}: {self.reason}"


def encode_error(site: str | None, error: BaseException, *, secrets: Iterable[str] = ()) -> str:
    """The ``Error.reason`` a site sends: JSON of its name, error class and a sanitized one-line reason."""
    reason = sanitize(str(error), secrets=secrets)
    return json.dumps({"site": site, "error": type(error).__name__, "reason": reason})


def decode_error(reason: str) -> SiteError:
    """Parse (and re-sanitize: the text is untrusted) an error reply's reason; plain text is accepted too."""
    try:
        data = json.loads(reason)
    except (TypeError, ValueError):
        data = None
    if not isinstance(data, dict):  # e.g. Flower's own "<class 'X'>:<'...'>" text
        match = re.match(r"<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>$", str(reason), re.S)
        if match:
            return SiteError(None, match.group(1), sanitize(match.group(2)))
        return SiteError(None, "Error", sanitize(str(reason)))
    site = data.get("site")
    try:
        site = None if site is None else check_site_name(site)
    except ReplyError:
        site = None
    error_class = str(data.get("error", "Error"))
    if not re.fullmatch(r"\w{1,64}", error_class):
        error_class = "Error"
    return SiteError(site, error_class, sanitize(str(data.get("reason", ""))))


def reply_error(msg: Message) -> SiteError | None:
    """The decoded error of an error reply, None for a regular reply."""
    return decode_error(msg.error.reason) if msg.has_error() else None


# ------------------------------------------------------------------------------------------------ numbers
def count(value: Any, key: str, *, upper: float | None = None) -> int:
    """``value`` as a finite, non-negative integer (at most ``upper``), else ReplyError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"metric {key!r} is not a number ({type(value).__name__})")
    if not math.isfinite(value) or value < 0 or float(value) != math.floor(value):
        raise ReplyError(f"metric {key!r}={value!r} is not a finite non-negative integer")
    if upper is not None and value > upper:
        raise ReplyError(f"metric {key!r}={value:g} exceeds the {upper:g} the site declared")
    return int(value)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReplyError(f"metric {key!r} is not a number ({type(value).__name__})")
    return float(value)


def unit_or_nan(value: Any, key: str) -> float:
    """``value`` when it lies in [0, 1] or is NaN (undefined), else ReplyError."""
    number = _number(value, key)
    if not (math.isnan(number) or 0.0 <= number <= 1.0):
        raise ReplyError(f"metric {key!r}={number:g} outside [0, 1]")
    return number


# ------------------------------------------------------------------------------------------------ describe
@dataclass(frozen=True)
class DescribeReply:
    """A checked ``describe`` reply: who the site is and the counts every later reply is bounded by."""

    site: str
    role: str
    cohort: str
    n_cases: int
    n_events: int
    n_train_cases: int
    info: dict[str, Any] = field(default_factory=dict)  # genes, groups, strong-kind (training sites)
    strong_dim: int | None = None


def reply_info(msg: Message) -> dict[str, Any]:
    """The JSON ``info`` ConfigRecord of a reply (ReplyError when missing or not a JSON object)."""
    try:
        info = json.loads(str(msg.content.config_records["info"]["json"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ReplyError(f"reply has no readable 'info' record ({type(error).__name__})") from error
    if not isinstance(info, dict):
        raise ReplyError("reply 'info' is not a JSON object")
    return info


def reply_metrics(msg: Message) -> dict[str, Any]:
    """The single MetricRecord of a reply as a dict (ReplyError unless exactly one)."""
    records = msg.content.metric_records
    if len(records) != 1:
        raise ReplyError(f"reply must hold exactly one MetricRecord, not {len(records)}")
    return dict(next(iter(records.values())))


def parse_describe(msg: Message) -> DescribeReply:
    """Check a ``describe`` reply: a safe site name, a known role, counts that add up."""
    info, metrics = reply_info(msg), reply_metrics(msg)
    for key in ("site", "role", "cohort"):
        if not isinstance(info.get(key), str):
            raise ReplyError(f"describe reply lacks {key!r}")
    site = check_site_name(info["site"])
    if info["role"] not in ROLES:
        raise ReplyError(f"describe reply: role {info['role'][:20]!r} is not one of {ROLES}")
    n_cases = count(metrics.get("n-cases"), "n-cases")
    n_events = count(metrics.get("n-events"), "n-events", upper=n_cases)
    n_train = count(metrics.get("n-train-cases"), "n-train-cases", upper=n_cases)
    strong_dim = metrics.get("strong-dim")
    if strong_dim is not None:
        strong_dim = count(strong_dim, "strong-dim", upper=1_000_000)
    extra = {k: v for k, v in info.items() if k not in ("site", "role", "cohort")}
    return DescribeReply(
        site, info["role"], str(info["cohort"])[:64], n_cases, n_events, n_train, extra, strong_dim
    )


# ------------------------------------------------------------------------------------------------ updates
def check_update(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Raise ReplyError unless ``update`` has the global model's names, shapes and a real float dtype.

    A non-float reference array (an integer buffer) must come back with exactly its dtype. Float arrays must
    be finite. Integer, bool and complex arrays in place of float weights are rejected (they would bypass the
    norm screening or break the aggregation).
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise ReplyError(
            f"array keys differ from the global model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for key, value in update.items():
        ref = reference[key]
        if value.shape != ref.shape:
            raise ReplyError(f"array {key!r} has shape {value.shape}, expected {ref.shape}")
        if np.issubdtype(ref.dtype, np.floating):
            if not np.issubdtype(value.dtype, np.floating):
                raise ReplyError(f"array {key!r} has dtype {value.dtype}, expected a float dtype")
            if not np.all(np.isfinite(value)):
                n_bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
                raise ReplyError(f"array {key!r} holds {n_bad} NaN/Inf value(s)")
        elif value.dtype != ref.dtype:
            raise ReplyError(f"array {key!r} has dtype {value.dtype}, expected {ref.dtype}")


def check_train_metrics(
    metrics: Mapping[str, Any], declared: DescribeReply | None, required: str = "num-examples"
) -> dict[str, float]:
    """The numeric train metrics: ``required`` (the aggregation weight) must be there, and ``num-examples``
    and ``n-events`` (when sent) are finite non-negative integers bounded by the describe counts."""
    if required not in metrics:
        raise ReplyError(f"metric {required!r} missing")
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if "num-examples" in metrics:
        out["num-examples"] = count(
            metrics["num-examples"], "num-examples", upper=declared and declared.n_train_cases
        )
    if "n-events" in metrics:  # not bounded by num-examples: a central-DP wrapper may reset the weights first
        out["n-events"] = count(metrics["n-events"], "n-events", upper=declared and declared.n_events)
    return out


def check_eval_metrics(metrics: Mapping[str, Any], declared: DescribeReply | None) -> dict[str, Any]:
    """Checked evaluation metrics: counts within the describe counts, C-index & co. in [0, 1] or NaN."""
    unknown = sorted(set(metrics) - set(EVAL_METRICS))
    if unknown:
        raise ReplyError(f"evaluation reply has unknown metric(s) {unknown[:3]}")
    n = count(metrics.get("num-examples"), "num-examples", upper=declared and declared.n_cases)
    events = count(metrics.get("n-events"), "n-events", upper=min(n, declared.n_events) if declared else n)
    out: dict[str, Any] = {"num-examples": n, "n-events": events}
    if "missing-genes" in metrics:
        out["missing-genes"] = count(metrics["missing-genes"], "missing-genes", upper=None)
    for key in UNIT_METRICS:
        if key in metrics:
            out[key] = unit_or_nan(metrics[key], key)
    if "loss" in metrics:
        loss = _number(metrics["loss"], "loss")
        out["loss"] = loss if math.isfinite(loss) else math.nan
    if KM_GRID_KEY in metrics:
        out.update(_check_km(metrics, n))
    return out


def _check_km(metrics: Mapping[str, Any], n: int) -> dict[str, Any]:
    grid = metrics.get(KM_GRID_KEY)
    if not isinstance(grid, list):
        raise ReplyError("km-grid is not a list")
    out: dict[str, Any] = {KM_GRID_KEY: [_number(v, KM_GRID_KEY) for v in grid]}
    for group in ("low", "high"):
        curve = metrics.get(f"km-{group}")
        if not isinstance(curve, list) or len(curve) != len(grid):
            raise ReplyError(f"km-{group} must be a list as long as km-grid ({len(grid)})")
        out[f"km-{group}"] = [unit_or_nan(v, f"km-{group}") for v in curve]
        size = out[f"km-n-{group}"] = count(metrics.get(f"km-n-{group}"), f"km-n-{group}", upper=n)
        out[f"km-events-{group}"] = count(metrics.get(f"km-events-{group}"), f"km-events-{group}", upper=size)
    return out


# ------------------------------------------------------------------------------------------------ styles
def check_style_record(record: Mapping[str, Any], widths: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """A checked style-summary record: ``{modality: {"count": int, "mu_mean": float64 [width], ...}}``.

    Every key is ``<modality>.<field>`` (:data:`STYLE_MODALITIES` x :data:`STYLE_FIELDS`), a modality sent
    has all its fields, ``count`` is an integer >= 1, each vector holds ``widths[modality]`` (the channels
    CADE re-styles: ``model.dim``, or the WSI features with ``model.cade.position=input``) finite numbers and
    the variances are >= 0; otherwise ReplyError with a one-line reason.
    """
    allowed = {f"{m}.{f}" for m in STYLE_MODALITIES for f in STYLE_FIELDS}
    unknown = sorted(str(k) for k in record if k not in allowed)
    if unknown:
        raise ReplyError(f"style summary has unknown key(s) {[k[:40] for k in unknown[:3]]}")
    out: dict[str, dict[str, Any]] = {}
    for modality in STYLE_MODALITIES:
        present = [f for f in STYLE_FIELDS if f"{modality}.{f}" in record]
        if not present:
            continue
        missing = [f for f in STYLE_FIELDS if f not in present]
        if missing:
            raise ReplyError(f"style summary of {modality!r} lacks {missing}")
        if modality not in widths:
            raise ReplyError(f"style summary of {modality!r} is not expected in this run")
        values: dict[str, Any] = {"count": count(record[f"{modality}.count"], f"{modality}.count")}
        if values["count"] < 1:
            raise ReplyError(f"style summary {modality}.count is 0")
        for name in STYLE_VECTORS:
            values[name] = _style_vector(record[f"{modality}.{name}"], f"{modality}.{name}", widths[modality])
        out[modality] = values
    if not out:
        raise ReplyError("style summary record is empty")
    return out


def _style_vector(value: Any, key: str, dim: int) -> np.ndarray:
    """``value`` as ``dim`` finite float64 numbers (>= 0 for a variance), else ReplyError naming ``key``."""
    numbers = isinstance(value, list) and all(isinstance(v, int | float) for v in value)
    if not numbers or any(isinstance(v, bool) for v in value):
        raise ReplyError(f"style summary {key!r} is not a list of numbers")
    if len(value) != dim:
        raise ReplyError(f"style summary {key!r} has {len(value)} values, expected {dim} (its channels)")
    array = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ReplyError(f"style summary {key!r} holds NaN/Inf")
    if key.endswith("_var") and np.any(array < 0):
        raise ReplyError(f"style summary {key!r} holds a negative variance")
    return array
