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


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with Hydra ``overrides`` as given (no schema check)."""
    search_path = f"hydra.searchpath=[file://{sites_dir()}]"
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(config_name=name, overrides=[search_path, *overrides])
    return cfg


def load_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with command-line style ``key=value`` overrides.

    Every override is checked first (:func:`fedprog.schema.check_overrides`): an unknown key, a wrong type or
    an unknown group choice raises :class:`fedprog.schema.ConfigError` with a one-line message. ``sites/`` is
    on the search path, so ``federation=<name>`` selects ``sites/federation/<name>.yaml``.
    """
    from fedprog.schema import check_overrides

    if overrides:
        check_overrides(
            name,
            overrides,
            groups(),
            lambda group_overrides: compose_config(name, group_overrides),
            lambda choices: key_comments(name, choices),
            options_declaring,
        )
    return compose_config(name, overrides)


def groups() -> dict[str, list[str]]:
    """Config groups (``data``, ``model``, ``strategy``, ``federation``...) and their options."""
    from fedprog.schema import config_groups

    return config_groups(config_dir(), sites_dir())


def group_file(group: str, option: str) -> Path:
    """The YAML file of one group option (``configs/<group>/`` or ``sites/<group>/``)."""
    for root in (config_dir(), sites_dir()):
        path = root / group / f"{option}.yaml"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no {group} option {option!r} under {config_dir()} or {sites_dir()}")


def options_declaring(path: str) -> list[str]:
    """Group choices (``group=option``) whose YAML declares ``path``, e.g. ``strategy=fedprox``."""
    from fedprog.schema import yaml_comments

    group = path.split(".", 1)[0]
    options = groups().get(group, [])
    return [f"{group}={o}" for o in options if path in yaml_comments(group_file(group, o), prefix=group)]


def key_comments(name: str, choices: Mapping[str, str] | None = None) -> dict[str, str]:
    """Dotted key -> YAML comment for ``configs/<name>.yaml`` and its group options (``choices`` win)."""
    from fedprog.schema import default_choices, yaml_comments

    command_file = config_dir() / f"{name}.yaml"
    selected = {**default_choices(command_file), **(choices or {})}
    comments: dict[str, str] = {}
    for group, option in selected.items():
        comments.update(yaml_comments(group_file(group, option), prefix=group))
    own = yaml_comments(command_file)
    comments.update({key: text for key, text in own.items() if text or key not in comments})
    return comments


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
