"""Run Flower 1.42's SuperLink with only its Fleet API on the public address; Control and Runtime on loopback.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode register``)
and the Runtime API (ServerAppIo, the ServerApp's link) from ONE HTTP application on one ``--host:--port``;
``--fleet-api-address`` and ``--control-api-address`` are deprecated and only move the legacy gRPC servers
(checked by starting ``flower-superlink`` 1.42: the HTTP Control API still answers on ``--host:--port``).
Flower's open-source Control API has no authentication, so whoever reaches that port can register node
keys, start runs and unregister sites.

``python -m fedprog.deploy.gate --public-host H --public-port P -- <flower-superlink args>`` builds Flower's
own application (same argument parsing, same lifespan, same state) and serves it on two sockets:

- ``--host:--port`` of the Flower arguments: every API; the launcher binds it to loopback only;
- ``--public-host:--public-port``: only ``/v1/fleet/*`` and ``/health``; any other path (Control API,
  Runtime API, ``/docs``, ``/openapi.json``) answers 404 there.

Both sockets use the same TLS certificate. The SuperExec Flower starts for the ServerApp dials the loopback
socket. This relies on Flower 1.42 internals (``_parse_superlink_lifespan_config``, ``create_app``) and is
pinned to that version (:data:`FLOWER_VERSION`).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import posixpath
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

FLOWER_VERSION = "1.42"
GRACEFUL_SHUTDOWN_S = 3  # open `flwr run --stream` connections would hold a SIGTERM (state is in the DB)
PUBLIC_PATH_PREFIXES = ("/v1/fleet/",)
PUBLIC_PATHS = frozenset({"/health"})
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def is_public_path(path: str) -> bool:
    """Return True for the paths served on the public (Fleet) socket (normalised paths only, no ``..``)."""
    if posixpath.normpath(path) != path.rstrip("/") or "//" in path:
        return False
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PATH_PREFIXES)


def is_loopback(host: str) -> bool:
    """Return True when ``host`` is a loopback address or ``localhost``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class FleetOnlyGate:
    """ASGI wrapper: full API on the loopback control port, Fleet API and /health on every other socket."""

    def __init__(self, app: Callable[..., Awaitable[None]], control_port: int) -> None:
        self.app = app
        self.control_port = int(control_port)

    def allows(self, scope: Scope) -> bool:
        """Return True when this request may reach Flower's application."""
        server, client = scope.get("server"), scope.get("client")
        on_control = (
            server is not None
            and int(server[1]) == self.control_port
            and client is not None
            and is_loopback(str(client[0]))
        )
        return on_control or is_public_path(str(scope.get("path", "")))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass allowed requests and lifespan events to Flower; answer 404 to the rest."""
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": "not served on the public Fleet address"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 404, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def serve(public_host: str, public_port: int, flower_args: Sequence[str]) -> None:
    """Parse ``flower_args`` as ``flower-superlink`` does and serve its app behind :class:`FleetOnlyGate`."""
    import importlib

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.main import create_app

    # the package re-exports a function of the same name, so import the module by its path
    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")

    sys.argv = ["flower-superlink", *flower_args]
    config = flower._parse_superlink_lifespan_config()
    if not is_loopback(config.host):
        raise SystemExit(f"fedprog gate: the Control/Runtime API host {config.host!r} must be loopback")
    if int(public_port) == int(config.port):
        raise SystemExit(f"fedprog gate: public port {public_port} must differ from the control port")
    app = create_app(config, flower.SuperLinkLifespan)
    uv_config = uvicorn.Config(
        app=FleetOnlyGate(app, control_port=config.port),
        reload=False,
        access_log=True,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        workers=1,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    sockets = [_bind(config.host, config.port), _bind(public_host, int(public_port))]
    print(
        f"fedprog gate: Control/Runtime/Fleet API on {config.host}:{config.port} (loopback), "
        f"Fleet API only on {public_host}:{public_port}",
        flush=True,
    )
    uvicorn.Server(uv_config).run(sockets=sockets)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedprog.deploy.gate --public-host H --public-port P -- <flower-superlink args>``."""
    parser = argparse.ArgumentParser(prog="python -m fedprog.deploy.gate")
    parser.add_argument("--public-host", required=True)
    parser.add_argument("--public-port", type=int, required=True)
    parser.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else list(args.flower_args)
    serve(args.public_host, args.public_port, flower_args)


if __name__ == "__main__":
    main()
