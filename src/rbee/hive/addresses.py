"""Addresses: the host others reach a bound socket at, and listening sockets.

The hive binds each worker's socket itself and hands the descriptor to the
child, so the worker's address is known before the process starts and is
reachable wherever the hive is.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

__all__ = ["WILDCARDS", "listen_socket", "reachable_host", "url_host"]

#: Bind addresses that mean every address of the machine.
WILDCARDS = ("", "0.0.0.0", "::")


def url_host(host: str) -> str:
    """``host`` as it goes in a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def reachable_host(bind_host: str, toward: str | None = None) -> str:
    """The address others use to reach a socket bound to ``bind_host``.

    A wildcard bind is reachable at the address of the interface that routes
    toward ``toward`` (the queen), else at the host name's address.
    """
    if bind_host not in WILDCARDS:
        return bind_host
    target = urlsplit(toward).hostname if toward else None
    if target:
        family = socket.AF_INET6 if ":" in target else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # a UDP connect only picks a route; nothing is sent
                return str(probe.getsockname()[0])
        except OSError:
            pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def listen_socket(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host`` (port 0: any free port)."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        if port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
