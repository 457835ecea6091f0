"""Real rbee processes for integration and end-to-end tests.

Each daemon runs as its own process with its own ``RBEE_HOME`` and port; at
teardown the process and everything it spawned is stopped (children first
found through psutil, so a killed hive cannot leave workers behind).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s ({last})")


class Daemon:
    """One rbee daemon process (queen, hive or worker)."""

    def __init__(self, name: str, args: list[str], *, home: Path, url: str, env: dict[str, str] | None = None):
        self.name = name
        self.args = args
        self.home = home
        self.url = url
        self.env = {**os.environ, "RBEE_HOME": str(home), "RBEE_LOG_LEVEL": "info", **(env or {})}
        self.log_path = home / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> Daemon:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_http(self.url + "/health", timeout_s, self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} did not start:\n{self.log()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def descendants(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.proc.wait(10)  # reaped here, not left to the garbage collector

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        children = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=5)


def queen(home: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> Daemon:
    args = [str(BIN / "queen-rbee"), "--host", "127.0.0.1", "--port", str(port), *extra]
    return Daemon("queen", args, home=home, url=f"http://127.0.0.1:{port}", env=env)


def hive(
    home: Path,
    port: int,
    queen_url: str,
    hive_id: str,
    *extra: str,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
) -> Daemon:
    args = [
        str(BIN / "rbee-hive"),
        "--host",
        host,
        "--port",
        str(port),
        "--queen-url",
        queen_url,
        "--hive-id",
        hive_id,
        *extra,
    ]
    return Daemon(f"hive-{hive_id}", args, home=home, url=f"http://{host}:{port}", env=env)


def wait_for(predicate: Any, timeout_s: float = 15.0, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s} s")


class StallingHive:
    """A stand-in hive that accepts every job and never says anything about it.

    ``POST /v1/jobs`` answers 201 at once; the job's stream sends its headers
    and then nothing, for as long as the connection stays open. It keeps a
    queen job that forwards to it ``running`` for a test.
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        closing = threading.Event()
        self._closing = closing

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = b'{"job_id": "job-stalled", "sse_url": "/v1/jobs/job-stalled/stream"}'
                self.send_response(201)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                self.wfile.flush()
                closing.wait(120)

            def do_DELETE(self) -> None:
                self.send_response(202)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StallingHive:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
