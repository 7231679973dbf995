"""The ``fedprog`` console script: ``fedprog <command> [sub-command] [ARG] key=value ...``.

Every option is a Hydra override on ``configs/<config>.yaml``; a bare positional argument fills the
command's positional key (for example ``fedprog data check DIR`` sets ``data.root=DIR``).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from fedprog.config import load_config


@dataclass(frozen=True)
class Command:
    """One CLI command: its config, its implementation and the key its positional argument sets."""

    config: str
    target: str  # "module:function", the function takes the composed DictConfig
    help: str
    positional: str | None = None


COMMANDS: dict[tuple[str, ...], Command] = {
    ("synth",): Command("synth", "fedprog.data.synth:main", "generate the default multi-site cohort"),
    ("data", "check"): Command(
        "data_check", "fedprog.data.check:main", "validate a dataset and print its summary", "data.root"
    ),
    ("train",): Command("train", "fedprog.protocol:main", "centralized cross-cancer protocol"),
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
    ("audit", "verify"): Command("audit", "fedprog.deploy.audit:verify_main", "verify an audit log", "path"),
}


def _usage() -> str:
    lines = ["usage: fedprog <command> [ARG] [key=value ...]", "", "commands:"]
    for words, command in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {command.help}")
    return "\n".join(lines)


def _match(argv: Sequence[str]) -> tuple[Command, list[str]]:
    for length in (2, 1):
        words = tuple(argv[:length])
        if words in COMMANDS:
            return COMMANDS[words], list(argv[length:])
    raise SystemExit(f"fedprog: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedprog`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    command, rest = _match(argv)
    overrides = [arg for arg in rest if "=" in arg]
    positionals = [arg for arg in rest if "=" not in arg]
    if positionals:
        if command.positional is None or len(positionals) > 1:
            raise SystemExit(f"fedprog {' '.join(argv[:2])}: unexpected argument(s) {positionals}")
        overrides.append(f"{command.positional}={positionals[0]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler; avoid doubled lines
    cfg = load_config(command.config, overrides)
    module_name, function_name = command.target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(cfg)
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
