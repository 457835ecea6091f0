"""A local HTTP server of model files, with the ways real servers go wrong.

Tests of downloads need a server and there is no internet: :class:`ModelServer`
serves files on 127.0.0.1 from a thread, with HTTP ``Range``, and on request
drops the connection midway, lies about the length, serves a web page, is
slow (for cancellation), or imitates the Hugging Face hub's resolve URLs
(``/{repo}/resolve/{revision}/{file}`` answering with a redirect to storage
and the ``X-Linked-Etag`` / ``X-Linked-Size`` / ``X-Repo-Commit`` headers).
:func:`tiny_gguf` makes a small, complete GGUF file (header, one F32 tensor).
"""

from __future__ import annotations

import hashlib
import http.server
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelServer", "Route", "tiny_gguf"]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up (a cancelled download) is expected here


def tiny_gguf(n_floats: int = 64 * 1024, *, arch: str = "llama", name: str = "Tiny test model") -> bytes:
    """A complete GGUF v3 file: metadata, one F32 tensor of ``n_floats`` and its data."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kvs = [
        s("general.architecture") + struct.pack("<I", 8) + s(arch),
        s("general.name") + struct.pack("<I", 8) + s(name),
        s("general.file_type") + struct.pack("<II", 4, 0),
        s(f"{arch}.context_length") + struct.pack("<II", 4, 256),
    ]
    tensor = s("weights") + struct.pack("<IQIQ", 1, n_floats, 0, 0)  # 1 dim, F32, offset 0
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, len(kvs)) + b"".join(kvs) + tensor
    head += b"\0" * (-len(head) % 32)
    # Data that differs from byte to byte, so a wrong offset changes the hash.
    data = bytes((i * 7 + 3) % 251 for i in range(n_floats * 4))
    return head + data


@dataclass
class Route:
    body: bytes
    content_type: str = "application/octet-stream"
    ranges: bool = True
    #: Send this many bytes of the body, then close, on the next ``drops`` requests.
    drop_after: int | None = None
    drops: int = 1
    #: Announce ``Content-Length`` plus this (positive: more than is sent; negative: less).
    lie: int = 0
    #: Pause between chunks of 64 KiB (slow servers, for cancellation).
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    location: str | None = None  # a redirect


class ModelServer:
    """``with ModelServer() as server: server.add("/m.gguf", data); server.url("/m.gguf")``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                server._handle(self, head=True)

            def do_GET(self) -> None:
                server._handle(self, head=False)

        self._httpd = _Server((host, 0), Handler)
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="model-server", daemon=True
        )

    def __enter__(self) -> ModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def add(self, path: str, body: bytes, **options: Any) -> Route:
        route = Route(body, **options)
        self.routes[path] = route
        return route

    def add_file(self, path: str, file: Path, **options: Any) -> Route:
        return self.add(path, file.read_bytes(), **options)

    def add_hf(
        self,
        repo: str,
        filename: str,
        body: bytes,
        *,
        storage: ModelServer | None = None,
        revision: str = "main",
        etag: str | None = None,
        **options: Any,
    ) -> str:
        """Serve ``body`` the way the hub serves an LFS file; returns its SHA-256.

        The hub answers the resolve URL with a redirect to its storage, another
        host (``storage``: give a second server) that serves the bytes.
        """
        sha = hashlib.sha256(body).hexdigest()
        storage = storage or self
        path = f"/storage/{sha}"
        storage.add(path, body, **options)
        self.add(
            f"/{repo}/resolve/{revision}/{filename}",
            b"",
            status=302,
            location=storage.url(path),
            headers={
                "X-Repo-Commit": "0123456789abcdef0123456789abcdef01234567",
                "X-Linked-Etag": f'"{etag or sha}"',
                "X-Linked-Size": str(len(body)),
                "ETag": '"0000"',
            },
        )
        return sha

    def ranges_asked(self, path: str) -> list[str | None]:
        return [rng for _, p, rng in self.requests if p == path]

    # -- serving -----------------------------------------------------------

    def _handle(self, h: http.server.BaseHTTPRequestHandler, *, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        rng = h.headers.get("Range")
        with self._lock:
            self.requests.append((h.command, path, rng))
            route = self.routes.get(path)
            drop = None
            if route is not None and route.drop_after is not None and route.drops > 0:
                route.drops -= 1
                drop = route.drop_after
        if route is None:
            self._send(h, 404, b"not found", {"Content-Type": "text/plain", "X-Error-Code": "EntryNotFound"}, head)
            return
        if route.location is not None:
            headers = {"Location": route.location, **route.headers}
            self._send(h, route.status, b"", headers, head)
            return
        if route.status != 200:
            self._send(h, route.status, route.body, {"Content-Type": route.content_type, **route.headers}, head)
            return
        body = route.body
        status, start = 200, 0
        headers = {"Content-Type": route.content_type, "Accept-Ranges": "bytes" if route.ranges else "none"}
        headers.update(route.headers)
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if route.ranges and match:
            start = int(match.group(1))
            if start >= len(body):
                headers["Content-Range"] = f"bytes */{len(body)}"
                self._send(h, 416, b"", headers, head)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        payload = body[start:]
        headers["Content-Length"] = str(max(0, len(payload) + route.lie))
        if route.lie < 0:
            payload = payload[: len(payload) + route.lie]
        if route.lie > 0 or drop is not None:
            headers["Connection"] = "close"
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        if head:
            return
        if drop is not None:
            payload = payload[:drop]
        try:
            for offset in range(0, len(payload), 65536):
                h.wfile.write(payload[offset : offset + 65536])
                h.wfile.flush()
                if route.delay_s:
                    time.sleep(route.delay_s)
        except OSError:
            return
        if route.lie > 0 or drop is not None:
            h.close_connection = True

    @staticmethod
    def _send(
        h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool
    ) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)
