"""Compose Hydra configs from ``configs/`` and convert them to and from Flower run-config."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

JSON_PREFIX = "json:"


def _resource_dir(name: str) -> Path:
    """Return ``<name>/`` packaged inside fedprog (wheel install) or beside the package (source tree)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"fedprog {name}/ folder not found next to {package}")


def config_dir() -> Path:
    """Return the folder holding the Hydra configs."""
    return _resource_dir("configs")


def sites_dir() -> Path:
    """Return ``sites/``; its ``federation/`` sub-folder is the Hydra group of site partitions."""
    return _resource_dir("sites")


def load_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with command-line style ``key=value`` overrides.

    ``sites/`` is on the search path, so ``federation=<name>`` selects ``sites/federation/<name>.yaml``.
    """
    search_path = f"hydra.searchpath=[file://{sites_dir()}]"
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(config_name=name, overrides=[search_path, *overrides])
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve interpolations and return plain Python containers."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_run_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Flatten a (resolved) config into Flower run-config: dotted keys, scalar values.

    Flower accepts only ``bool | int | float | str`` values, so lists, dicts inside lists and ``None`` are
    written as ``"json:<json text>"``; :func:`from_run_config` reverses this exactly.
    """
    tree = to_container(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
    flat: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, bool | int | float | str) and not (
            isinstance(node, str) and node.startswith(JSON_PREFIX)
        ):
            flat[prefix] = node
        else:
            flat[prefix] = JSON_PREFIX + json.dumps(node)

    walk("", tree)
    return flat


def from_run_config(flat: Mapping[str, Any]) -> DictConfig:
    """Rebuild the nested config from :func:`to_run_config` output (ignores keys it did not write)."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        if isinstance(value, str) and value.startswith(JSON_PREFIX):
            value = json.loads(value[len(JSON_PREFIX) :])
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return OmegaConf.create(tree)
