"""The typed schema of every command's config, read from its YAML defaults; overrides are checked against it.

Each key's expected type is the type of its default value in the composed config (``int``, ``float``,
``bool``, ``str``, ``list``, ``dict``); a key whose default is ``null`` (or ``???``) takes any value. Text,
list and map keys also take ``null``; a number or flag takes it only where its YAML comment mentions ``null``.
:func:`check_overrides` runs before Hydra composes the final config, so a typo or a wrong type fails in one
line, naming the key, what it expected and the nearest valid key or choice, before Ray or Flower starts.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

ANY = "any"
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)")
_KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(.*)$")


class ConfigError(ValueError):
    """A user error in a command's configuration; its message is one line naming the key."""


@dataclass(frozen=True)
class Key:
    """One declared key: dotted path, default value (unresolved) and the comment of its YAML line."""

    path: str
    default: Any
    comment: str = ""

    @property
    def expected(self) -> str:
        """The type name an override of this key must have (``any`` for null, missing or interpolated)."""
        return expected_type(self.default)

    @property
    def nullable(self) -> bool:
        """Whether ``null`` is valid: for text, lists and maps; for a number or flag only where documented."""
        return self.expected in (ANY, "str", "list", "dict") or "null" in self.comment


def expected_type(default: Any) -> str:
    """Type name derived from a default value: bool, int, float, str, list, dict or ``any``."""
    if default is None or (isinstance(default, str) and (default == "???" or "${" in default)):
        return ANY
    for kind in (bool, int, float, str, list, dict):
        if isinstance(default, kind):
            return kind.__name__
    return ANY


def accepts(expected: str, value: Any) -> bool:
    """Whether ``value`` (as Hydra parsed it from the command line) fits the ``expected`` type name."""
    if expected == ANY or (isinstance(value, str) and "${" in value):
        return True
    if expected == "bool":
        return isinstance(value, bool)
    if expected == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if expected == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected == "str":
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    return isinstance(value, list if expected == "list" else dict)


# ------------------------------------------------------------------------------------------------ discovery
def config_groups(config_dir: Path, sites_dir: Path) -> dict[str, list[str]]:
    """Hydra config groups (sub-folders of ``configs/`` and ``sites/federation``) and their options."""
    groups: dict[str, list[str]] = {}
    for folder in [*sorted(config_dir.iterdir()), sites_dir / "federation"]:
        if folder.is_dir():
            groups.setdefault(folder.name, [])
            groups[folder.name] += sorted(p.stem for p in folder.glob("*.yaml"))
    return groups


def default_choices(config_file: Path) -> dict[str, str]:
    """``group -> option`` of a command config's ``defaults`` list."""
    loaded = OmegaConf.load(config_file)
    choices: dict[str, str] = {}
    for entry in loaded.get("defaults", []) if isinstance(loaded, DictConfig) else []:
        if isinstance(entry, Mapping) or OmegaConf.is_dict(entry):
            for group, option in dict(entry).items():
                choices[str(group)] = str(option)
    return choices


def yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """Dotted key -> trailing comment of its line in a YAML file (block mappings only; ``@package`` aware)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and (match := _PACKAGE.match(lines[0])):
        prefix = "" if match.group(1) == "_global_" else match.group(1)
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        match = _KEY_LINE.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, name, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([p for p in (prefix, *(k for _, k in stack), name) if p])
        stack.append((indent, name))
        comments[dotted] = rest.split(" #", 1)[1].strip() if " #" in rest else ""
    return comments


def declared_keys(cfg: DictConfig, comments: Mapping[str, str] | None = None) -> dict[str, Key]:
    """Every dotted key of ``cfg`` (inner nodes included) with its unresolved default and comment."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    keys: dict[str, Key] = {}

    def walk(prefix: str, node: Any) -> None:
        for name, value in node.items():
            path = f"{prefix}.{name}" if prefix else str(name)
            keys[path] = Key(path, value, (comments or {}).get(path, ""))
            if isinstance(value, dict):
                walk(path, value)

    walk("", tree)
    return keys


def nearest(word: str, candidates: Sequence[str]) -> str | None:
    """The candidate closest to ``word``: same last component first, else difflib's best match."""
    leaf = word.rsplit(".", 1)[-1]
    same_leaf = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf and c != word]
    if same_leaf:
        return min(same_leaf, key=len)
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not matches:
        leaves = {c.rsplit(".", 1)[-1]: c for c in sorted(candidates, key=len, reverse=True)}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
        matches = [leaves[close[0]]] if close else []
    return matches[0] if matches else None


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys still ``???`` (mandatory, no default) after composition."""
    return [path for path, key in declared_keys(cfg).items() if key.default == "???"]


# ------------------------------------------------------------------------------------------------ checking
@dataclass(frozen=True)
class CommandSchema:
    """What a command accepts: its groups (with their options) and its declared keys."""

    name: str
    groups: dict[str, list[str]]
    keys: dict[str, Key]
    declared_by: Callable[[str], list[str]] | None = None  # path -> group choices that declare it


def _suggest(candidate: str | None) -> str:
    return f"; did you mean {candidate!r}?" if candidate else ""


def check_group(name: str, group: str, value: Any, groups: Mapping[str, list[str]]) -> None:
    """Raise ConfigError unless ``value`` is one of the group's options."""
    options = groups[group]
    if str(value) not in options:
        hint = _suggest(nearest(str(value), options))
        raise ConfigError(f"{group}={value}: no such {group} (valid: {', '.join(options)}){hint}")


def check_key(schema: CommandSchema, path: str, value: Any, *, adding: bool = False) -> None:
    """Raise ConfigError when ``path`` is not declared, or ``value`` does not fit its declared type."""
    key = schema.keys.get(path)
    if key is None:
        parent = schema.keys.get(path.rsplit(".", 1)[0]) if "." in path else None
        if adding and parent is not None and isinstance(parent.default, dict):
            return  # `+map.newkey=...` extends an open map (e.g. data.tables)
        choices = schema.declared_by(path) if schema.declared_by else []
        if choices:
            only = ", ".join(choices)
            raise ConfigError(f"unknown key {path!r}: declared only by {only}; choose one first")
        hint = _suggest(nearest(path, [k for k in schema.keys if not k.startswith("hydra")]))
        raise ConfigError(f"unknown key {path!r}{hint}")
    if value is None:
        if not key.nullable:
            raise ConfigError(f"{path}=null: {path} expects {key.expected}, not null")
        return
    if not accepts(key.expected, value):
        raise ConfigError(f"{path}={value!r}: {path} expects {key.expected} (default: {key.default!r})")


def _parse(parser: Any, line: str) -> Any:
    """One Hydra override, parsed; a syntax error names the override."""
    from hydra.errors import HydraException

    try:
        return parser.parse_override(line)
    except HydraException as error:  # Hydra raises its base class for syntax errors
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{line}: not a valid override ({reason}); write key=value") from error


def check_overrides(
    name: str,
    overrides: Sequence[str],
    groups: Mapping[str, list[str]],
    compose: Callable[[list[str]], DictConfig],
    comments: Callable[[Mapping[str, str]], Mapping[str, str]],
    declared_by: Callable[[str], list[str]] | None = None,
) -> None:
    """Check Hydra ``overrides`` of command config ``name``; raise ConfigError (one line) at the first error.

    Group choices (``strategy=fedprox``) are checked against the group's options first; the keys then against
    the config composed with those choices (``compose``), whose YAML comments (``comments(choices)``) say
    which keys take ``null``; ``declared_by(path)`` names the group choices that would declare an unknown key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parsed = [_parse(OverridesParser.create(), line) for line in overrides]
    choices, group_lines, key_overrides = {}, [], []
    for override in parsed:
        path = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line}: sweeps are not supported; give one value")
        if path in groups and override.package is None and override.type != OverrideType.DEL:
            check_group(name, path, override.value(), groups)
            choices[path] = str(override.value())
            group_lines.append(override.input_line)
        else:
            key_overrides.append(override)
    cfg = compose(group_lines)
    schema = CommandSchema(name, dict(groups), declared_keys(cfg, comments(choices)), declared_by)
    for override in key_overrides:
        adding = override.type in (OverrideType.ADD, OverrideType.FORCE_ADD)
        value = None if override.type == OverrideType.DEL else override.value()
        if override.type == OverrideType.DEL:
            if override.key_or_group not in schema.keys:
                check_key(schema, override.key_or_group, None)
            continue
        check_key(schema, override.key_or_group, value, adding=adding)
