"""``rbee queen start|status|stop`` and auto-start, with a temporary RBEE_HOME and a free port."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, str, dict[str, str]]]:
    """A home, a queen URL nothing listens on yet, and the environment; any queen left over is killed."""
    home = tmp_path / "home"
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN")}
    env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home), RBEE_CONFIG=str(tmp_path / "config.toml"))
    yield home, url, env
    pid_file = home / "queen.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def rbee(url: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, *args], capture_output=True, text=True, env=env, timeout=90
    )


def test_start_status_stop(cluster: tuple[Path, str, dict[str, str]]) -> None:
    home, url, env = cluster
    assert rbee(url, env, "queen", "status").returncode == 1

    started = rbee(url, env, "queen", "start", "--no-local-hive")
    assert started.returncode == 0, started.stderr
    assert url in started.stdout
    pid = int((home / "queen.pid").read_text())
    assert psutil.pid_exists(pid) and not gone(pid)
    log = home / "logs" / "queen.log"
    assert log.exists() and "rbee queen start" in log.read_text()

    again = rbee(url, env, "queen", "start", "--no-local-hive")
    assert again.returncode == 0 and "already running" in again.stdout

    status = rbee(url, env, "queen", "status")
    assert status.returncode == 0, status.stderr
    assert str(pid) in status.stdout
    assert rbee(url, env, "queen-check").returncode == 0

    stopped = rbee(url, env, "queen", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"pid {pid}" in stopped.stdout
    assert gone(pid)
    assert not (home / "queen.pid").exists()

    again = rbee(url, env, "queen", "stop")
    assert again.returncode == 0 and "not running" in again.stdout
    assert rbee(url, env, "queen", "status").returncode == 1


def test_start_reports_a_queen_that_exits_before_it_is_ready(cluster: tuple[Path, str, dict[str, str]]) -> None:
    home, url, env = cluster
    with socket.socket() as taken:  # something else holds the port, and never answers HTTP
        taken.bind(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        taken.listen(1)
        run = rbee(url, env, "queen", "start", "--no-local-hive")
    assert run.returncode == 1
    assert len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith("rbee: queen-rbee exited with code")
    assert str(home / "logs" / "queen.log") in run.stderr
    assert not (home / "queen.pid").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("rbee.hive") is None or importlib.util.find_spec("rbee.hive.embedded") is None,
    reason="the local hive (rbee.hive.embedded) is not built yet",
)
def test_a_command_starts_the_queen_when_it_is_not_running(cluster: tuple[Path, str, dict[str, str]]) -> None:
    home, url, env = cluster
    # The configured URL (the environment here): a queen is started there, never at a --queen-url elsewhere.
    env = {k: v for k, v in env.items() if k != "RBEE_NO_AUTOSTART"}
    other = subprocess.run(
        [str(BIN / "rbee"), "--queen-url", f"http://127.0.0.1:{free_port()}", "status"],
        capture_output=True, text=True, env={**env, "RBEE_QUEEN_URL": url}, timeout=30,
    )  # fmt: skip
    assert other.returncode == 1 and len(other.stderr.splitlines()) == 1 and "check --queen-url" in other.stderr
    assert not (home / "queen.pid").exists()
    env = {**env, "RBEE_QUEEN_URL": url}
    try:
        run = rbee(url, env, "queen-check")
        assert run.returncode == 0, run.stderr
        assert f"Started queen-rbee at {url} (log: {home / 'logs' / 'queen.log'})" in run.stderr
        assert (home / "queen.pid").exists()
        assert "Started" not in rbee(url, env, "queen-check").stderr  # running now: no second start
    finally:
        assert rbee(url, env, "queen", "stop").returncode == 0


def test_no_autostart_leaves_the_queen_stopped(cluster: tuple[Path, str, dict[str, str]]) -> None:
    home, url, env = cluster
    run = rbee(url, env, "queen-check")
    assert run.returncode == 1
    assert run.stderr.startswith(f"rbee: cannot reach the queen at {url}: connection refused")
    assert not (home / "queen.pid").exists()
