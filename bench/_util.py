"""Helpers shared by the benchmarks: ports, server processes, statistics, output.

A benchmark starts the servers it measures as subprocesses (so the client
never shares a core's event loop with the server), prints a table with the
exact command that produced it, and writes the same figures as JSON to
``bench/results/<name>.json`` (git-ignored).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from rbee.wire import http1

__all__ = [
    "RESULTS_DIR",
    "Conn",
    "Server",
    "command_line",
    "free_port",
    "llama_cpp_server_command",
    "llama_like_rbee",
    "visible",
    "goal",
    "holds_text",
    "machine",
    "new_loop",
    "percentile",
    "print_goals",
    "print_table",
    "start_server",
    "venv_bin",
    "write_results",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def venv_bin(name: str) -> str:
    """A console script installed next to the running interpreter."""
    return str(Path(sys.executable).parent / name)


@dataclass
class Server:
    """A server subprocess; stopped (and its children) by :meth:`stop`."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    home: Path
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
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
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    args: Sequence[str],
    *,
    port: int,
    env: dict[str, str] | None = None,
    home: Path | None = None,
    health_path: str = "/health",
    timeout_s: float = 30.0,
) -> Server:
    """Start ``args`` (a uvicorn-based daemon listening on ``port``) and wait for its health check.

    ``RBEE_HOME`` is a fresh temporary directory unless ``home`` is given; the
    process's output goes to ``<home>/server.log``.
    """
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory(prefix="rbee-bench-")
        home = Path(tmp.name)
    log_path = home / "server.log"
    full_env = {**os.environ, "RBEE_HOME": str(home), **(env or {})}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(args), env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, home, tmp)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(server.url + health_path, timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.stop()
    raise TimeoutError(f"{args[0]} did not answer {health_path} within {timeout_s} s")


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linear between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return float(ordered[lo])
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo))


def command_line() -> str:
    """The command that is running, as a person would type it."""
    module = sys.modules["__main__"].__spec__
    exe = os.path.relpath(sys.executable) if not sys.executable.startswith("/usr") else sys.executable
    if module is not None and module.name:
        return shlex.join([exe, "-m", module.name.removesuffix(".__main__"), *sys.argv[1:]])
    return shlex.join([exe, *sys.argv])


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpu_affinity": len(psutil.Process().cpu_affinity() or []) if hasattr(psutil.Process, "cpu_affinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def print_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "command": command_line(), "machine": machine(), "time": time.time(), **data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


# -- goals ---------------------------------------------------------------------------------------


def goal(name: str, target: str, measured: str, holds: bool | None, value: float | None = None) -> dict[str, Any]:
    """One row of a benchmark's goal table (``holds`` None: a figure with no goal)."""
    return {"goal": name, "target": target, "measured": measured, "holds": holds, "value": value}


def holds_text(holds: bool | None) -> str:
    return "-" if holds is None else ("yes" if holds else "NO")


def print_goals(rows: Sequence[dict[str, Any]]) -> None:
    print_table(
        [(r["goal"], r["measured"], r["target"], holds_text(r["holds"])) for r in rows],
        ("goal", "measured", "target", "holds"),
    )


# -- a minimal HTTP/1.1 keep-alive client ------------------------------------------------


class Conn:
    """One keep-alive connection (:class:`rbee.wire.http1.Connection`); requests on it are sequential.

    The benchmarks measure servers, so the client must cost as little as it
    can: on two cores an httpx client (about 0.8 ms of CPU per request here)
    would be a large part of what is measured. It is the queen's own small
    client, used one connection at a time.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._conn: http1.Connection | None = None

    async def open(self) -> Conn:
        self._conn = await http1.Connection.open(self.host, self.port)
        return self

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        on_chunk: Callable[[bytes, float], None] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request; return the status and the whole body.

        ``on_chunk(chunk, arrival)`` sees each piece of a chunked body as it
        arrives (``time.perf_counter()`` when it was read).
        """
        conn = self._conn
        assert conn is not None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.writer.write(http1.request_head(self.host, self.port, method, path, headers, body) + (body or b""))
        status, answer = await conn.head()
        parts = []
        async for piece in conn.pieces(answer):
            if on_chunk is not None:
                on_chunk(piece, time.perf_counter())
            parts.append(piece)
        return status, b"".join(parts)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is there (uvicorn[standard] brings it): the client's own costs stay small."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()


# -- llama-cpp-python, set up as rbee's worker runs llama.cpp -------------------------------

#: ``llama_cpp.server`` with weight repacking off (``use_extra_bufts = False``); argv: its flags.
_LLAMA_CPP_SERVER_NO_REPACK = """\
import runpy, sys
import llama_cpp.llama_cpp as C
_default = C.llama_model_default_params
def _params():
    params = _default()
    params.use_extra_bufts = False
    return params
C.llama_model_default_params = _params
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def llama_cpp_server_command() -> list[str]:
    """How to start ``llama_cpp.server`` here (add its flags after).

    On Intel AMX CPUs llama.cpp repacks weights for its AMX kernels, which crash at the
    first decode in the llama.cpp that llama-cpp-python 0.3.36 vendors; the server has no
    flag to turn repacking off, so it is started through a patch of its model parameters,
    as rbee's worker loads the model (:func:`rbee.worker.engine.repack_default`).
    """
    from rbee.worker.engine import repack_default

    if repack_default():
        return [sys.executable, "-m", "llama_cpp.server"]
    return [sys.executable, "-c", _LLAMA_CPP_SERVER_NO_REPACK]


def llama_like_rbee(model_path: str, **kwargs: Any) -> Any:
    """llama-cpp-python's ``Llama``, running llama.cpp as rbee's worker does.

    * weight repacking as the worker chooses it (off on AMX CPUs, see above; ``Llama``
      has no parameter for it, so its model parameters are patched while it loads);
    * ggml's tiled CPU matmul off, as the worker's ``--batch-invariant`` has it (ggml
      reads the switch once per process, so it is set before any model runs here);
    * flash attention on, as llama.cpp's default (``auto``) resolves it on the CPU
      (``Llama`` turns it off unless asked).
    """
    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    from rbee.worker.engine import repack_default

    defaults = low.llama_model_default_params
    repack = repack_default()

    def params() -> Any:
        p = defaults()
        p.use_extra_bufts = repack
        return p

    low.llama_model_default_params = params
    try:
        return Llama(model_path=model_path, verbose=False, **{"flash_attn": True, **kwargs})
    finally:
        low.llama_model_default_params = defaults


_MARKERS = re.compile(r"<start_of_image>|<end_of_image>|\[multimodal\]")


def visible(text: str) -> str:
    """Text as rbee renders it: without the media markers (``<start_of_image>``) that the
    bundled model emits and llama-cpp-python prints (rbee's engine never makes them text)."""
    return _MARKERS.sub("", text)
