"""Run outputs: NaN-safe ``results.json``, the markdown ``report.md``, round plots and the run config."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike
from omegaconf import DictConfig, ListConfig, OmegaConf
from sksurv.nonparametric import kaplan_meier_estimator

from fedprog.survival.metrics import (
    MetricUndefinedError,
    check_risk,
    check_survival,
    logrank_split,
    median_split,
)

__all__ = [
    "CONFIG_FILE",
    "REPORT_FILE",
    "ReportBuilder",
    "ReportError",
    "UnsafePathError",
    "environment_info",
    "markdown_table",
    "plot_rounds",
    "safe_name",
    "safe_output_path",
    "save_run_config",
    "to_jsonable",
    "write_json",
]

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
"""Name of the human report inside a run folder."""
CONFIG_FILE = "config.yaml"
"""Name of the resolved run configuration inside a run folder."""
MISSING_CELL = "n/a"
"""How a NaN / missing value is shown in markdown tables."""
DEFAULT_PLOT_DPI = 150
KM_DPI = 150  # resolution of the Kaplan-Meier PNGs
KM_CONF_LEVEL = 0.95  # level of the pointwise (log-log) band drawn around each Kaplan-Meier curve
"""Resolution of the round plots."""
HOLDOUT_ROLE = "holdout"
"""``role`` value of held-out (evaluation-only) sites, drawn dashed in :func:`plot_rounds`."""
_VERSIONED_PACKAGES = {
    "fedprog": "fedprog",
    "torch": "torch",
    "flwr": "flwr",
    "numpy": "numpy",
    "pandas": "pandas",
    "sksurv": "scikit-survival",
}


class ReportError(ValueError):
    """A report input is unusable (a missing column, an empty table, a table that is not a DataFrame)."""


class UnsafePathError(ReportError):
    """An output file name built from untrusted text (a site name) would leave the run folder."""


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,100}")  # "@": baseline models (site@pooled)


def safe_name(text: str) -> str:
    """``text`` if it is a safe file-name part ([A-Za-z0-9_.@-], no ``..``); else UnsafePathError."""
    if not _SAFE_NAME.fullmatch(text) or ".." in text or text.startswith("."):
        raise UnsafePathError(f"{text[:40]!r} is not a safe file name part ([A-Za-z0-9_.@-], no '..')")
    return text


def safe_output_path(out_dir: str | Path, *parts: str) -> Path:
    """``out_dir/<parts...>`` after checking each part (:func:`safe_name`) and that the resolved path stays
    inside ``out_dir`` (symlinks included).

    Raises
    ------
    UnsafePathError
        A part is not a safe name, or the path resolves outside ``out_dir``.
    """
    root = Path(out_dir).resolve()
    path = root.joinpath(*(safe_name(part) for part in parts))
    if not path.resolve().is_relative_to(root):
        raise UnsafePathError(f"{'/'.join(parts)[:60]!r} resolves outside the run folder")
    return path


# ----------------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types; NaN and +-inf become ``None``.

    Handles dicts (keys made strings), lists/tuples/sets, numpy scalars and arrays, pandas DataFrames
    (a list of row records), Series (a dict), ``pd.NA``/``NaT``, dataclasses, OmegaConf configs (resolved),
    ``Path``, ``datetime``/``date`` (ISO 8601) and objects with ``tolist()`` (CPU tensors).

    Raises
    ------
    TypeError
        For an object of any other type, naming its type.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, DictConfig | ListConfig):
        return to_jsonable(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, pd.DataFrame):
        return [to_jsonable(record) for record in obj.to_dict(orient="records")]
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dt.datetime | dt.date):
        return obj.isoformat()
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    raise TypeError(f"write_json: cannot serialise an object of type {type(obj).__name__}: {obj!r:.80}")


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented, strictly valid JSON (NaN -> ``null``), atomically.

    Parameters
    ----------
    obj : Any
        Results: nested dicts/lists of numbers, strings, numpy/pandas objects (see :func:`to_jsonable`).
    path : str or Path
        Output file; parent folders are created.

    Returns
    -------
    Path
        The written file.

    Examples
    --------
    >>> import json, math, tempfile
    >>> out = write_json({"c_index": math.nan}, Path(tempfile.mkdtemp()) / "results.json")
    >>> json.loads(out.read_text())
    {'c_index': None}
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, out)
    return out


def environment_info() -> dict[str, Any]:
    """Versions and machine facts to store beside results.

    Returns
    -------
    dict
        ``python``, ``fedprog``, ``torch``, ``flwr``, ``numpy``, ``pandas``, ``sksurv`` (version strings, or
        ``None`` when a package is not installed), ``platform`` and ``device`` (the CUDA device name, or
        ``"cpu"``).
    """
    info: dict[str, Any] = {"python": platform.python_version()}
    for key, distribution in _VERSIONED_PACKAGES.items():
        try:
            info[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            log.warning("environment_info: package %s is not installed", distribution)
            info[key] = None
    info["platform"] = platform.platform()
    info["device"] = _device_name()
    return info


def _device_name() -> str:
    import torch  # deferred: only needed here, and heavy to import

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return "cpu"


# ----------------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------------


def save_run_config(cfg: DictConfig | Mapping[str, Any], out_dir: str | Path) -> Path:
    """Save the resolved configuration as ``<out_dir>/config.yaml``.

    Parameters
    ----------
    cfg : DictConfig or mapping
        The composed Hydra config (interpolations such as ``${oc.env:...}`` are resolved).
    out_dir : str or Path
        The run folder (created when missing).

    Returns
    -------
    Path
        The written YAML file; ``OmegaConf.load`` gives the config back.
    """
    config = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    out = Path(out_dir) / CONFIG_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(OmegaConf.to_yaml(config, resolve=True), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------------------
# Markdown report
# ----------------------------------------------------------------------------------------------------------


def _format_cell(value: Any, floatfmt: int) -> str:
    if value is None or value is pd.NA or value is pd.NaT:
        return MISSING_CELL
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.{floatfmt}f}" if math.isfinite(value) else MISSING_CELL
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame, floatfmt: int = 3) -> str:
    """Render ``df`` as a GitHub markdown table.

    Floats get ``floatfmt`` decimals, NaN shows as ``n/a``, numeric columns are right-aligned, and a named
    or non-default index becomes the first column(s).
    """
    table = df if isinstance(df.index, pd.RangeIndex) and df.index.name is None else df.reset_index()
    header = [str(column) for column in table.columns]
    numeric = [pd.api.types.is_numeric_dtype(table[column]) for column in table.columns]
    lines = [
        "| " + " | ".join(name.replace("|", "\\|") for name in header) + " |",
        "| " + " | ".join("---:" if is_num else "---" for is_num in numeric) + " |",
    ]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_format_cell(value, floatfmt) for value in row) + " |")
    return "\n".join(lines)


class ReportBuilder:
    """Assemble ``report.md`` from sections, tables and figures, in the order they are added.

    Parameters
    ----------
    out_dir : str or Path
        The run folder; ``report.md`` is written there and figures are linked relative to it.
    title : str
        The report's level-1 heading.

    Examples
    --------
    >>> import tempfile
    >>> report = ReportBuilder(tempfile.mkdtemp(), "demo").section("Setup", "Four sites.")
    >>> report.table("C-index", pd.DataFrame({"site": ["a"], "c_index": [0.61234]})).write().name
    'report.md'
    """

    def __init__(self, out_dir: str | Path, title: str) -> None:
        self.out_dir = Path(out_dir)
        self.title = title
        self._blocks: list[str] = []

    def section(self, title: str, text: str) -> ReportBuilder:
        """Add a level-2 heading with a paragraph of markdown text."""
        self._blocks.append(f"## {title}\n\n{text.strip()}")
        return self

    def table(self, title: str, df: pd.DataFrame, floatfmt: int = 3) -> ReportBuilder:
        """Add a level-2 heading with ``df`` as a markdown table (floats with ``floatfmt`` decimals)."""
        if not isinstance(df, pd.DataFrame):
            raise ReportError(f"table {title!r}: expected a pandas DataFrame, got {type(df).__name__}")
        body = markdown_table(df, floatfmt) if len(df.columns) else "(no columns)"
        self._blocks.append(f"## {title}\n\n{body}")
        return self

    def figure(self, title: str, png_path: str | Path) -> ReportBuilder:
        """Add a level-2 heading with an image link relative to the report folder.

        Raises
        ------
        FileNotFoundError
            ``png_path`` does not exist (draw the plot first).
        """
        path = Path(png_path)
        if not path.is_file():
            raise FileNotFoundError(f"figure {title!r}: image {path} does not exist")
        link = Path(os.path.relpath(path.resolve(), self.out_dir.resolve())).as_posix()
        self._blocks.append(f"## {title}\n\n![{title}]({link})")
        return self

    def render(self) -> str:
        """Return the markdown text of the report."""
        return "\n\n".join([f"# {self.title}", *self._blocks]) + "\n"

    def write(self) -> Path:
        """Write ``<out_dir>/report.md`` and return its path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / REPORT_FILE
        out.write_text(self.render(), encoding="utf-8")
        log.info("report written to %s", out)
        return out


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def plot_rounds(
    df: pd.DataFrame,
    path: str | Path,
    value: str = "c_index",
    by: str = "site",
    x: str = "round",
    *,
    title: str | None = None,
    dpi: int = DEFAULT_PLOT_DPI,
) -> Path:
    """Line plot of a metric per round, one line per site; held-out sites dashed with ``x`` markers.

    Parameters
    ----------
    df : DataFrame
        Long table with one row per (``x``, ``by``): columns ``x``, ``by``, ``value`` and, optionally,
        ``role`` (sites whose role is ``"holdout"`` are drawn dashed). NaN values leave gaps.
    path : str or Path
        Output PNG; parent folders are created.
    value, by, x : str, optional, defaults: "c_index", "site", "round"
        Column names of the y values, the line grouping and the x axis.
    title : str, optional
        Figure title (default: ``"<value> per <x>"``).
    dpi : int, optional, default: 150
        PNG resolution.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ReportError
        A column is missing (the message lists the available ones) or the table is empty.
    """
    missing = [column for column in (value, by, x) if column not in df.columns]
    if missing:
        raise ReportError(f"plot_rounds: column(s) {missing} not in table; available: {list(df.columns)}")
    if df.empty:
        raise ReportError(f"plot_rounds: empty table, nothing to plot for {value!r}")
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, group in df.groupby(by, sort=True):
        group = group.sort_values(x)
        holdout = "role" in group.columns and (group["role"] == HOLDOUT_ROLE).any()
        label = f"{name} ({HOLDOUT_ROLE})" if holdout else str(name)
        ax.plot(
            group[x].to_numpy(),
            group[value].to_numpy(dtype=float),
            linestyle="--" if holdout else "-",
            marker="x" if holdout else "o",
            markersize=4,
            label=label,
        )
    ax.set(xlabel=x, ylabel=value, title=title or f"{value} per {x}")
    if pd.api.types.is_integer_dtype(df[x]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi, bbox_inches="tight")
    return out


# ------------------------------------------------------------------------------------ Kaplan-Meier plots
def plot_km(
    time: ArrayLike,
    censorship: ArrayLike,
    risk: ArrayLike,
    path: str | Path,
    title: str,
    *,
    dpi: int = KM_DPI,
    conf_level: float = KM_CONF_LEVEL,
) -> Path:
    """Plot Kaplan-Meier curves of the median-split risk groups with the log-rank p-value; save a PNG.

    Parameters
    ----------
    time, censorship : array-like, shape = (n_samples,)
        Labels (months; 1 = censored).
    risk : array-like, float, shape = (n_samples,)
        Risk scores, higher = worse; high-risk group = ``risk >= median``.
    path : str or Path
        Output PNG (parent folders are created).
    title : str
        Figure title (for example ``"BRCA -> BLCA"``).
    dpi : int, optional, default: 150
        PNG resolution.
    conf_level : float, optional, default: 0.95
        Level of the shaded log-log pointwise confidence bands (groups with events only).

    Returns
    -------
    Path
        The written file. The legend shows each group's size and events and ``log-rank p`` (``n/a`` when the
        test is undefined, with the reason logged).
    """
    event, time_arr = check_survival(time, censorship)
    risk_arr = check_risk(risk, time_arr.size)
    high = median_split(risk_arr)
    try:
        p_label = f"log-rank p = {logrank_split(time_arr, ~event, risk_arr)[1]:.3g}"
    except MetricUndefinedError as err:
        log.warning("plot_km %s: log-rank p-value unavailable: %s", title, err)
        p_label = "log-rank p = n/a"
    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, members, color in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not members.any():
            continue
        has_events = bool(event[members].any())
        result = kaplan_meier_estimator(
            event[members],
            time_arr[members],
            conf_level=conf_level,
            conf_type="log-log" if has_events else None,
        )
        steps, prob = np.r_[0.0, result[0]], np.r_[1.0, result[1]]
        label = f"{name} (n={int(members.sum())}, events={int(event[members].sum())})"
        ax.step(steps, prob, where="post", color=color, label=label)
        if has_events:
            band = result[2]  # (2, n_unique_times): lower, upper
            ax.fill_between(
                steps, np.r_[1.0, band[0]], np.r_[1.0, band[1]], step="post", color=color, alpha=0.15, lw=0
            )
    ax.set(xlabel="time (months)", ylabel="survival probability", ylim=(0, 1.02), title=title)
    ax.legend(title=p_label, loc="best")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi, bbox_inches="tight")
    return out


def plot_km_aggregate(site: str, km: Mapping[str, Any], path: Path) -> Path:
    """Plot the aggregate KM curves a site sent (median-split risk groups) with its log-rank p-value."""
    figure = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    grid = np.asarray(km["km-grid"], dtype=float)
    for name, color in (("low", "tab:blue"), ("high", "tab:red")):
        curve = np.asarray(km[f"km-{name}"], dtype=float)
        label = f"{name} risk (n={int(km[f'km-n-{name}'])}, events={int(km[f'km-events-{name}'])})"
        ax.step(grid, curve, where="post", color=color, label=label)
    p = km.get("logrank-p", math.nan)
    p_label = f"log-rank p = {p:.3g}" if isinstance(p, float) and math.isfinite(p) else "log-rank p = n/a"
    ax.set(xlabel="time (months)", ylabel="survival probability", ylim=(0, 1.02), title=f"{site} (held out)")
    ax.legend(title=p_label, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=KM_DPI, bbox_inches="tight")
    return path
