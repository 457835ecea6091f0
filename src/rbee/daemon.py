"""Running a server process: bind checks, logging, uvicorn."""

from __future__ import annotations

import socket
import sys
from typing import Any

from rbee.config import BindRefused, check_bind
from rbee.narration import configure_logging, set_process_actor

__all__ = ["serve", "preflight"]


def preflight(component: str, host: str, token: str | None) -> None:
    """Refuse an unsafe bind before anything starts (exit 2 with one line)."""
    set_process_actor(component)
    configure_logging()
    try:
        check_bind(host, token)
    except BindRefused as exc:
        print(f"{component}: refusing to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(app: Any, host: str, port: int, *, sock: socket.socket | None = None) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    try:
        # The socket object itself, not its fd: uvicorn takes an fd for a Unix
        # socket, and TCP connections accepted that way keep Nagle's algorithm,
        # which holds each small SSE frame until the reader's delayed ACK (40 ms).
        server.run(sockets=[sock] if sock is not None else None)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
