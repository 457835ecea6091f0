"""A worker's process: starting it, waiting until it is ready, signalling and stopping it.

Workers run in their own session (a Ctrl-C meant for the hive does not reach
them directly; the hive stops them in order) and, on Linux, receive SIGTERM if
the hive itself dies without stopping them. A worker's token travels in its
environment, never in its argv (which other users can read).

Readiness is the worker's ``/v1/ready``: the socket listens before the worker
runs, so a probe can sit in the backlog; each probe races the process's exit,
so a worker that crashes while loading is noticed at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from rbee.errors import WorkerFailed
from rbee.hive.workers import WorkerProcess
from rbee.jobs.registry import emit_progress
from rbee.narration import current_job, narrate

__all__ = [
    "LOG_TAIL_LINES",
    "POLL_INTERVAL_S",
    "STOP_GRACE_S",
    "WORKER_COMMAND",
    "describe_exit",
    "log_tail",
    "probe",
    "progress",
    "send_signal",
    "start",
    "terminate",
    "tls_args",
    "wait_ready",
]

#: How a worker process is started; the hive appends the worker's own flags.
WORKER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "rbee.worker.main")

POLL_INTERVAL_S = 0.05
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 20


if sys.platform == "linux":
    import ctypes

    # Resolved now: the child runs this between fork and exec, where only
    # already-bound calls are safe.
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _PR_SET_PDEATHSIG = 1
    _SIGTERM = int(signal.SIGTERM)

    def _die_with_parent() -> None:
        _prctl(_PR_SET_PDEATHSIG, _SIGTERM, 0, 0, 0)

    _PREEXEC: Callable[[], None] | None = _die_with_parent
else:  # pragma: no cover - the hive stops its workers itself there
    _PREEXEC = None


def describe_exit(code: int | None) -> str:
    """How a process ended, in words (``exited with code 1``, ``was killed by SIGKILL``)."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a worker's log ("" when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def progress(done: int, total: int) -> None:
    """A ``worker_start`` progress step, when a job is spawning the worker."""
    if current_job() is not None:
        emit_progress("worker_start", done, total, "steps")


# -- starting -----------------------------------------------------------------


def tls_args(tls: tuple[Path, Path] | None) -> list[str]:
    """The worker's flags to serve HTTPS with the hive's certificate (paths only: the key stays in its file)."""
    if tls is None:
        return []
    return ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]


async def start(
    argv: list[str], log_path: Path, *, fd: int, home: Path, token: str | None = None
) -> asyncio.subprocess.Process:
    """Start ``argv`` in its own session with ``fd`` passed on, its output appended to ``log_path``."""
    env = dict(os.environ)
    env["RBEE_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    if token:
        env["RBEE_TOKEN"] = token  # the environment, not argv: other users can read argv
    else:
        env.pop("RBEE_TOKEN", None)
    with log_path.open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} rbee-hive starts: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=(fd,),
                env=env,
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        except OSError as exc:
            raise WorkerFailed(f"cannot start the worker process {argv[0]}: {exc.strerror or exc}") from None


# -- readiness ----------------------------------------------------------------


async def probe(
    http: httpx.AsyncClient, worker: WorkerProcess, timeout_s: float, *, token: str | None = None
) -> dict[str, Any] | None:
    """The worker's ``/v1/ready`` answer, or None when it does not answer (yet).

    ``token`` is the bearer token to send (the worker's own, else the hive's).
    """
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await http.get(f"{worker.url}/v1/ready", headers=headers, timeout=timeout_s)
    except (httpx.HTTPError, OSError):
        return None
    if response.status_code != 200:
        return None
    try:
        data = response.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def _probe_unless_exit(
    http: httpx.AsyncClient, worker: WorkerProcess, timeout_s: float, token: str | None
) -> dict[str, Any] | None:
    # The socket is listening before the worker runs, so a probe can sit in
    # the backlog; racing it against the exit notices a crash at once.
    asked = asyncio.ensure_future(probe(http, worker, timeout_s, token=token))
    exit_wait = asyncio.ensure_future(worker.exited.wait())
    try:
        await asyncio.wait({asked, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (asked, exit_wait):
            task.cancel()
        await asyncio.gather(asked, exit_wait, return_exceptions=True)
    if asked.cancelled() or asked.exception() is not None:
        return None
    return asked.result()


async def wait_ready(
    http: httpx.AsyncClient, worker: WorkerProcess, *, timeout_s: float, token: str | None = None
) -> None:
    """Return once ``worker`` says it is ready; :class:`WorkerFailed` if it exits, errs or takes too long."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    deadline = t0 + timeout_s
    loading_seen = False
    while True:
        if worker.exited.is_set():
            raise WorkerFailed(
                f"worker {worker.worker_id} {describe_exit(worker.exit_code)} before it was ready; "
                f"the last lines of {worker.log_path}:\n{log_tail(worker.log_path)}",
                worker_id=worker.worker_id,
            )
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise WorkerFailed(
                f"worker {worker.worker_id} was not ready within {timeout_s:g} s; "
                f"the last lines of {worker.log_path}:\n{log_tail(worker.log_path)}",
                worker_id=worker.worker_id,
            )
        ready = await _probe_unless_exit(http, worker, min(1.0, remaining), token)
        if ready is None:
            await asyncio.sleep(POLL_INTERVAL_S)
            continue
        if ready.get("state") == "error":
            detail = ready.get("error") or ready.get("message") or "no detail"
            raise WorkerFailed(
                f"worker {worker.worker_id} failed while loading {worker.model_id}: {detail}",
                worker_id=worker.worker_id,
            )
        if ready.get("ready"):
            worker.apply(ready)
            if worker.state == "starting":
                worker.state = "ready"
            progress(3, 3)
            narrate(
                "worker_ready",
                f"Worker {worker.worker_id} is ready at {worker.url} after {loop.time() - t0:.1f} s",
                actor="hive",
                worker_id=worker.worker_id,
                url=worker.url,
                startup_ms=round((loop.time() - t0) * 1000, 1),
            )
            return
        if not loading_seen:
            loading_seen = True
            progress(2, 3)
            narrate(
                "worker_loading",
                f"Worker {worker.worker_id} is loading {worker.model_id}",
                actor="hive",
                worker_id=worker.worker_id,
            )
        await asyncio.sleep(POLL_INTERVAL_S)


# -- stopping -----------------------------------------------------------------


def send_signal(worker: WorkerProcess, sig: int) -> None:
    """Send ``sig`` to the worker's process group (it leads one: anything it started goes too)."""
    if worker.proc.returncode is not None:
        return
    try:
        os.killpg(worker.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            worker.proc.send_signal(sig)
        except ProcessLookupError:
            pass


async def terminate(worker: WorkerProcess, grace_s: float) -> None:
    """SIGTERM, up to ``grace_s`` for the exit (its watcher sets ``exited``), then SIGKILL."""
    send_signal(worker, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace_s):
            await worker.exited.wait()
        return
    except TimeoutError:
        pass
    narrate(
        "worker_kill",
        f"Worker {worker.worker_id} did not stop within {grace_s:g} s; killing it",
        level="warn",
        actor="hive",
        worker_id=worker.worker_id,
    )
    send_signal(worker, signal.SIGKILL)
    try:
        async with asyncio.timeout(grace_s):
            await worker.exited.wait()
    except TimeoutError:
        pass
