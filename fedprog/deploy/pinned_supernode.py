"""Flower 1.42's SuperNode that runs only the apps (FABs) its hospital pinned by SHA-256.

Flower 1.42's own mechanism (``flower-supernode --trusted-entities``) accepts only FABs signed through Flower
Hub: a FAB submitted with ``flwr run <folder>`` carries no verification record, so with trusted entities set
the SuperNode refuses every locally built app (checked in ``flwr/supernode/start_client_internal.py``). It
cannot express "this consortium's app, this version" for an on-premises federation.

``python -m fedprog.deploy.pinned_supernode --app-hash H [--app-hash H2] [--audit LOG] [--site S] --
<flower-supernode args>`` runs Flower's own ``flower-supernode`` and hooks the one place where a new run's FAB
arrives (``_pull_and_store_message``'s ``get_fab``): a FAB whose SHA-256 (the hash ``flwr run`` prints, and
``fedprog.deploy.server.stage_app`` records) is not pinned is answered through Flower's own refusal path
(an ``INVALID_FAB`` error reply, "The FAB could not be verified."): the FAB is never stored, no task is
created and none of its code runs on the site. Every refusal is logged with both hashes and appended to the
site's audit log. Relies on Flower 1.42 internals; pinned to that version.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Any

logger = logging.getLogger("fedprog.deploy.pinned_supernode")

PIN_ENTITY = "fedprog-pinned-app"  # placeholder trusted entity: switches on Flower's FAB verification path
VALID = "Valid"


def fab_sha256(content: bytes) -> str:
    """Return the hex SHA-256 of a FAB's bytes (Flower's ``fab_hash``)."""
    return hashlib.sha256(content).hexdigest()


def pin_fabs(
    module: Any, pinned: Collection[str], on_refused: Callable[[int, str], None] | None = None
) -> None:
    """Patch Flower's SuperNode ``module`` (``flwr.supernode.start_client_internal``) to run pinned FABs only.

    Parameters
    ----------
    module
        The module whose ``_pull_and_store_message`` and ``_verify_fab`` are replaced.
    pinned : Collection[str]
        Allowed FAB SHA-256 hex digests (lower case).
    on_refused : callable, optional
        Called with ``(run_id, fab_sha256)`` for every refused FAB.
    """
    allowed = {h.lower() for h in pinned}
    if not allowed:
        raise ValueError("pin_fabs: no pinned app hash given")
    original = module._pull_and_store_message

    def pull_pinned(*args: Any, get_fab: Callable[[str, int], Any], **kwargs: Any) -> Any:
        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digest = fab_sha256(fab.content)
            if digest in allowed:
                fab.verifications = {**fab.verifications, "valid_license": VALID}
            else:
                logger.error(
                    "refused run %s: its app (FAB sha256 %s) is not pinned by this site (pinned: %s)",
                    run_id,
                    digest,
                    sorted(allowed),
                )
                fab.verifications = {"valid_license": ""}  # Flower's refusal: error reply, nothing stored
                if on_refused is not None:
                    on_refused(run_id, digest)
            return fab

        kwargs["trusted_entities"] = {PIN_ENTITY: "pinned by fedprog"}
        return original(*args, get_fab=checked_get_fab, **kwargs)

    module._pull_and_store_message = pull_pinned
    module._verify_fab = lambda fab, _trusted: fab_sha256(fab.content) in allowed


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the pins, patch Flower's SuperNode, then run ``flower-supernode`` with the other arguments."""
    parser = argparse.ArgumentParser(prog="python -m fedprog.deploy.pinned_supernode")
    parser.add_argument("--app-hash", action="append", required=True, help="pinned FAB SHA-256 (repeatable)")
    parser.add_argument("--audit", default=None, help="the site's audit log (refusals are appended)")
    parser.add_argument("--site", default="?")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else list(args.flower_args)
    if flower_args[:1] == ["flower-supernode"]:  # the launcher names the command it wraps
        flower_args = flower_args[1:]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    def on_refused(run_id: int, digest: str) -> None:
        if args.audit:
            from fedprog.audit import AuditLog

            AuditLog(args.audit).append("app_refused", site=args.site, run_id=int(run_id), fab_sha256=digest)

    pin_fabs(importlib.import_module("flwr.supernode.start_client_internal"), args.app_hash, on_refused)
    logger.info("site %s runs only app(s) with FAB sha256 %s", args.site, sorted(args.app_hash))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
