"""The ``fedprog`` console script: ``fedprog [--debug] <command> [sub-command] [ARG] key=value ...``.

Every option is a Hydra override on ``configs/<config>.yaml``; a bare positional argument fills the
command's positional key (for example ``fedprog data check DIR`` sets ``data.root=DIR``). Overrides are
checked before anything starts (:mod:`fedprog.schema`); a user error prints one line and exits with 2
(``--debug`` shows the traceback instead). ``fedprog <command> --help`` lists the command's keys.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedprog.config import config_dir, group_file, groups, key_comments, load_config

USAGE_ERROR = 2
HELP_FLAGS = {"-h", "--help"}
CONFIG_ERRORS = (HydraException, OmegaConfBaseException)  # raised for a config they cannot compose
DEBUG_HINT = "(run with --debug for the traceback)"
QUIET_LOGGERS = (
    "alembic",
    "sqlalchemy",
    "ray",
    "numexpr",
    "matplotlib",
    "PIL",
    "h5py",
    "urllib3",
    "filelock",
)
LOG_DIGITS = 4  # significant digits of the numbers in log lines


@dataclass(frozen=True)
class Command:
    """One CLI command: its config, its implementation and the key its positional argument sets."""

    config: str
    target: str  # "module:function", the function takes the composed DictConfig
    help: str
    positional: str | None = None
    many: bool = False  # the positional key is a list: every bare argument is one item


COMMANDS: dict[tuple[str, ...], Command] = {
    ("synth",): Command("synth", "fedprog.data.synth:main", "generate the default multi-site cohort"),
    ("data", "check"): Command(
        "data_check", "fedprog.data.check:main", "validate a dataset and print its summary", "data.root"
    ),
    ("data", "add"): Command(
        "data_add", "fedprog.data.check:add_main", "register a cohort folder and check it", "data.root"
    ),
    ("train",): Command("train", "fedprog.protocol:main", "centralized cross-cancer protocol"),
    ("compare",): Command(
        "compare", "fedprog.compare:compare_main", "paired comparison of rotation runs", "runs", many=True
    ),
    ("simulate",): Command(
        "simulate", "fedprog.federated.simulation:main", "federated simulation (main job)"
    ),
    ("certs",): Command(
        "certs", "fedprog.deploy.certs:main", "make the consortium CA, server cert, node keys"
    ),
    ("certs", "check"): Command("certs", "fedprog.deploy.certs:check_main", "verify certificates and keys"),
    ("site", "start"): Command(
        "site", "fedprog.deploy.site:start_main", "check data, start a SuperNode", "config"
    ),
    ("site", "fab-hash"): Command(
        "fab_hash", "fedprog.deploy.site:fab_hash_main", "print the app hash (FAB SHA-256) sites pin", "app"
    ),
    ("site", "stop"): Command("site", "fedprog.deploy.site:stop_main", "stop a site's SuperNode", "config"),
    ("server", "start"): Command(
        "server", "fedprog.deploy.server:start_main", "start the SuperLink", "config"
    ),
    ("server", "enrol"): Command(
        "server", "fedprog.deploy.server:enrol_main", "register site keys", "config"
    ),
    ("server", "run"): Command(
        "server", "fedprog.deploy.server:run_main", "start a run and follow it", "config"
    ),
    ("server", "stop"): Command("server", "fedprog.deploy.server:stop_main", "stop the SuperLink", "config"),
    ("audit", "verify"): Command("audit", "fedprog.audit:verify_main", "verify an audit log", "path"),
}


def version() -> str:
    """The installed fedprog version (the package's ``__version__`` in a source checkout)."""
    import importlib.metadata

    import fedprog

    try:
        return importlib.metadata.version("fedprog")
    except importlib.metadata.PackageNotFoundError:
        return fedprog.__version__


def usage() -> str:
    """The top-level help: commands and global flags."""
    lines = [
        "usage: fedprog [--debug] <command> [ARG] [key=value ...]",
        "       fedprog <command> --help    the command's config file, keys and defaults",
        "",
        "commands:",
    ]
    for words, command in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {command.help}")
    lines += [
        "",
        "options:",
        "  -h, --help       show this help (after a command: the command's help)",
        "  --version        print the fedprog version",
        "  --debug          show tracebacks and DEBUG logs instead of one-line errors",
    ]
    return "\n".join(lines)


def _format_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def command_help(words: Sequence[str], section: str | None = None) -> str:
    """One command's help: purpose, config file, groups with their options, its own keys with defaults.

    With ``section`` (``fedprog simulate --help training``): every key under that group or section instead.
    """
    from fedprog.schema import declared_keys, default_choices

    command = COMMANDS[tuple(words)]
    config_file = config_dir() / f"{command.config}.yaml"
    arg = f" {command.positional.upper().replace('.', '_')}" if command.positional else ""
    lines = [
        f"usage: fedprog {' '.join(words)}{arg} [key=value ...]",
        "",
        f"{command.help}.",
        f"config: {config_file}" + (f" (the positional argument sets {command.positional})" if arg else ""),
    ]
    choices = default_choices(config_file)
    options = groups()
    if choices:
        lines += ["", "groups (group=option; its keys are group.key=value, listed by `--help GROUP`):"]
        for group, option in choices.items():
            where = group_file(group, option).relative_to(group_file(group, option).parents[2])
            lines.append(f"  {group + '=' + option:<24} options: {', '.join(options[group])}  ({where})")
    cfg = load_config(command.config)
    comments = key_comments(command.config)
    declared = declared_keys(cfg, comments)
    if section is not None:
        paths = [path for path in declared if path.startswith(f"{section}.")]
        if not paths:
            raise SystemExit(f"fedprog {' '.join(words)}: no keys under {section!r}")
        lines = [f"keys under {section} of fedprog {' '.join(words)} (key=default  meaning):"]
    else:
        paths = _own_keys(config_file)
        lines += ["", "keys (key=default  meaning):"]
    for key in (declared[path] for path in paths if path in declared):
        if isinstance(key.default, dict) and key.default:
            continue
        setting = f"{key.path}={_format_value(key.default)}"
        lines.append(f"  {setting:<34} {key.comment}".rstrip())
    return "\n".join(lines)


def _own_keys(config_file: Path) -> list[str]:
    """Dotted keys written in the command's own YAML file, in file order (not those of its groups' files)."""
    from fedprog.schema import yaml_comments

    return [key for key in yaml_comments(config_file) if key != "defaults"]


def _match(argv: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    for length in (2, 1):
        words = tuple(argv[:length])
        if words in COMMANDS:
            return words, list(argv[length:])
    raise SystemExit(f"fedprog: unknown command {' '.join(argv[:2])!r}\n\n{usage()}")


def quote(value: str) -> str:
    """``value`` as a quoted Hydra string (paths with spaces, commas or brackets stay one value)."""
    # Hydra unescapes backslashes only where they precede a quote (or the closing quote)
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return f"'{escaped}'"


def _overrides(words: Sequence[str], rest: Sequence[str]) -> list[str]:
    command = COMMANDS[tuple(words)]
    overrides = [arg for arg in rest if "=" in arg or arg.startswith("~")]
    positionals = [arg for arg in rest if arg not in overrides]
    if positionals:
        if command.positional is None or (len(positionals) > 1 and not command.many):
            raise SystemExit(f"fedprog {' '.join(words)}: unexpected argument(s) {positionals}")
        values = [quote(arg) for arg in positionals]
        overrides.append(f"{command.positional}=" + (f"[{','.join(values)}]" if command.many else values[0]))
    return overrides


def require_values(words: Sequence[str], cfg: DictConfig) -> None:
    """Raise ConfigError naming the first mandatory key (``???``) left without a value.

    Layout keys under ``data.`` (other than ``data.root``) are left to the dataset's manifest.

    Commands whose positional argument is a config file (``site``, ``server``) fill such keys from that file.
    """
    from fedprog.schema import ConfigError, missing_keys

    command = COMMANDS[tuple(words)]
    if command.positional == "config":
        return
    for key in missing_keys(cfg):
        if key.startswith("data.") and key != "data.root":
            continue  # `???` under data=folder: the dataset's own fedprog.yaml gives it (checked on load)
        how = f"fedprog {' '.join(words)} {key.upper()}" if key == command.positional else f"{key}=..."
        raise ConfigError(f"{key} has no value; give {how}")


def implementation(command: Command) -> Callable[[DictConfig], int | None]:
    """Import and return the function that runs ``command`` (only once its config is valid)."""
    module_name, function_name = command.target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def one_line(error: BaseException) -> str:
    """A user-facing, one-line message for a config error (Hydra's ``+key`` advice removed)."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return text.split("To append to your config use +")[0].strip()


def round_numbers(value: Any, digits: int = LOG_DIGITS) -> Any:
    """``value`` with each float (in tuples, lists and dicts too) rounded to ``digits`` significant digits."""
    if isinstance(value, float | np.floating) and math.isfinite(value):
        return float(f"{float(value):.{digits}g}")
    if isinstance(value, tuple | list):
        return type(value)(round_numbers(item, digits) for item in value)
    if isinstance(value, dict):
        return {key: round_numbers(item, digits) for key, item in value.items()}
    return value


class RoundNumbers(logging.Filter):
    """Round the floats of a log record's arguments, so log lines read 25.51, not 25.509999999999998."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Round ``record.args`` in place; never drops a record."""
        if record.args:
            record.args = round_numbers(record.args)
        return True


def configure_logging(*, debug: bool = False) -> None:
    """INFO logs of fedprog and Flower (DEBUG with ``--debug``); third-party chatter silenced.

    Quiet by default: alembic's plugin set-up lines (Flower's state database), Ray's ``FutureWarning``s and
    other libraries' INFO lines are not shown unless ``--debug`` is given.
    """
    import warnings

    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler; avoid doubled lines
    for handler in logging.getLogger().handlers:
        handler.addFilter(RoundNumbers())
    if not debug:
        for noisy in QUIET_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray(\.|$)")  # ray.init's tips


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedprog`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if argv[:1] == ["--version"]:
        print(f"fedprog {version()}")
        return 0
    if not argv or argv[0] in HELP_FLAGS | {"help"}:
        print(usage())
        return 0
    words, rest = _match(argv)
    label = f"fedprog {' '.join(words)}"
    try:
        if HELP_FLAGS & set(rest):
            sections = [arg for arg in rest if arg not in HELP_FLAGS and "=" not in arg]
            print(command_help(words, sections[0] if sections else None))
            return 0
        configure_logging(debug=debug)
        cfg = load_config(COMMANDS[words].config, _overrides(words, rest))
        require_values(words, cfg)
    except (*CONFIG_ERRORS, ValueError, LookupError, OSError) as error:  # one line; --debug: the traceback
        if debug:
            raise
        print(f"{label}: {one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    function = implementation(COMMANDS[words])
    try:
        result = function(cfg)
    except (ValueError, LookupError, OSError) as error:
        if debug:
            raise
        logging.getLogger(__name__).debug("command failed", exc_info=True)
        print(f"{label}: {type(error).__name__}: {one_line(error)} {DEBUG_HINT}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
