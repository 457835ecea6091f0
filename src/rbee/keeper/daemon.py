"""Starting and stopping the queen process on this machine.

``start_queen`` runs ``python -m rbee.queen.main`` in its own session (Ctrl-C in
the keeper's terminal does not reach it), appends its output to
``$RBEE_HOME/logs/queen.log``, writes its pid to ``$RBEE_HOME/queen.pid`` once
it answers ``/health``, and reports the last log line if it exits first.
``stop_queen`` sends SIGTERM, waits for the process to go, then SIGKILLs its
process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rbee.config import is_loopback, rbee_home
from rbee.keeper.client import QueenClient
from rbee.keeper.errors import KeeperError, QueenStartFailed

__all__ = [
    "StartedQueen",
    "StoppedQueen",
    "start_queen",
    "stop_queen",
    "queen_paths",
    "bind_of",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "alive",
    "read_pid",
    "last_log_line",
    "terminate",
]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOCAL_HIVE_WAIT_S = 10.0


@dataclass(frozen=True)
class StartedQueen:
    url: str
    pid: int | None
    log: Path
    already_running: bool = False


@dataclass(frozen=True)
class StoppedQueen:
    pid: int | None
    killed: bool = False
    was_running: bool = True


def queen_paths(home: Path | None = None) -> tuple[Path, Path]:
    """``(pid file, log file)`` under the rbee data directory."""
    home = home or rbee_home()
    return home / "queen.pid", home / "logs" / "queen.log"


def bind_of(url: str) -> tuple[str, int]:
    """The host and port a queen must bind to answer at ``url`` (a loopback URL only)."""
    parts = urlsplit(url)
    host = (parts.hostname or "127.0.0.1").strip("[]")
    try:
        port = parts.port
    except ValueError:
        raise KeeperError(f"the queen URL {url!r} has an invalid port") from None
    if not is_loopback(host):
        raise KeeperError(f"the queen at {url} is not on this machine; start and stop it there")
    return host, port if port is not None else (443 if parts.scheme == "https" else 80)


def last_log_line(log: Path) -> str:
    try:
        with log.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else ""


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; only its parent has not looked yet
        import psutil

        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except Exception:
        return True


def _is_queen(pid: int) -> bool:
    """Whether ``pid`` still runs a queen (a pid file can outlive its process, and pids are reused)."""
    try:
        import psutil

        cmdline = " ".join(psutil.Process(pid).cmdline())
    except Exception:
        return alive(pid)
    return "rbee.queen.main" in cmdline or "queen-rbee" in cmdline


def spawn_logged(cmd: list[str], log: Path, env: dict[str, str], what: str) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session, its output appended to ``log`` after a header line.

    The daemon keeps the file bounded itself (``RBEE_LOG_FILE``: :mod:`rbee.narration.output`);
    one already past the limit is rotated here first.
    """
    from rbee.narration.output import LOG_FILE_ENV, rotate_if_large

    rotate_if_large(log, env)
    env = {**env, LOG_FILE_ENV: str(log)}
    with log.open("ab") as log_fh:
        log_fh.write(f"--- {what}: {' '.join(cmd[1:])} at {time.ctime()}\n".encode())
        log_fh.flush()
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=log_fh,
            env=env,
            start_new_session=True,
            close_fds=True,
        )


def start_queen(
    url: str,
    *,
    token: str | None = None,
    local_hive: bool = True,
    home: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> StartedQueen:
    """Start a queen that answers at ``url``, or find the one already there."""
    pid_file, log = queen_paths(home)
    with QueenClient(url, token, connect_timeout_s=1.0) as client:
        health = client.health()
        if health is not None:
            if health.get("component") not in (None, "queen"):
                raise QueenStartFailed(f"{url} answers, but as {health.get('component')!r}, not a queen")
            return StartedQueen(url, read_pid(pid_file), log, already_running=True)
        host, port = bind_of(url)
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "rbee.queen.main", "--host", host, "--port", str(port)]
        cmd.append("--local-hive" if local_hive else "--no-local-hive")
        env = dict(os.environ)
        if token:
            env["RBEE_TOKEN"] = token  # the environment, not argv: other users can read argv
        try:
            proc = spawn_logged(cmd, log, env, "rbee queen start")
        except OSError as exc:
            raise QueenStartFailed(f"cannot run {sys.executable}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            if client.health() is not None:
                break
            code = proc.poll()
            if code is not None:
                if client.health() is not None:
                    # Another keeper started a queen on this port first: use that one.
                    return StartedQueen(url, read_pid(pid_file), log, already_running=True)
                last = last_log_line(log) or "no output"
                raise QueenStartFailed(f"queen-rbee exited with code {code} before it was ready: {last} (log: {log})")
            if time.monotonic() > deadline:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5.0)
                raise QueenStartFailed(f"queen-rbee did not answer at {url} within {timeout_s:.0f} s (log: {log})")
            time.sleep(0.1)
        pid_file.write_text(f"{proc.pid}\n")
        if local_hive:
            _wait_for_local_hive(client, min(LOCAL_HIVE_WAIT_S, max(0.0, deadline - time.monotonic())))
    return StartedQueen(url, proc.pid, log)


def _wait_for_local_hive(client: QueenClient, timeout_s: float) -> None:
    """The local hive registers with its first heartbeat; jobs sent before that find no hive."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = client.info()
        except KeeperError:
            return
        if not info.get("local_hive") or info.get("hives", 0) >= 1:
            return
        time.sleep(0.1)


def _pid_for(url: str, token: str | None, pid_file: Path) -> int | None:
    # The queen answering at this URL knows its own pid; the pid file covers a
    # queen that no longer answers (or asks for a token we do not have).
    with QueenClient(url, token, connect_timeout_s=1.0) as client:
        try:
            pid = client.info().get("pid")
        except KeeperError:
            pid = None
    if isinstance(pid, int) and alive(pid):
        return pid
    pid = read_pid(pid_file)
    if pid is not None and alive(pid) and _is_queen(pid):
        return pid
    return None


def terminate(pid: int, name: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout_s`` for it to go, then SIGKILL its session; True if killed.

    Raises ``ProcessLookupError`` when it had already gone.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise KeeperError(f"not allowed to stop {name} (pid {pid})") from None
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not alive(pid):
        return False
    # Its session holds what it started (the hive's workers); end them all.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 2.0
    while alive(pid) and time.monotonic() < kill_deadline:
        time.sleep(0.05)
    return True


def stop_queen(url: str, *, token: str | None = None, home: Path | None = None) -> StoppedQueen:
    """SIGTERM the queen, wait up to :data:`STOP_TIMEOUT_S` for it to go, then SIGKILL."""
    pid_file, _ = queen_paths(home)
    bind_of(url)  # refuses a queen on another machine
    pid = _pid_for(url, token, pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return StoppedQueen(None, was_running=False)
    try:
        killed = terminate(pid, "queen-rbee")
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return StoppedQueen(pid, was_running=False)
    if read_pid(pid_file) == pid:
        pid_file.unlink(missing_ok=True)
    return StoppedQueen(pid, killed=killed)
