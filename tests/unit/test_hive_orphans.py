"""Pid records of a hive's workers, and what a restarted hive does with them.

A record names a process by pid and start time, so a pid the system reused is
never touched; a record left by a live hive is not this hive's business.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from rbee import narration
from rbee.hive.supervisor import Supervisor

pytestmark = pytest.mark.timeout(30)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for a worker an earlier hive left running."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def supervisor(tmp_path: Path, http: httpx.AsyncClient) -> Supervisor:
    return Supervisor(home=tmp_path, http=http, state_dir=tmp_path / "workers", stop_grace_s=2.0)


def write_record(state_dir: Path, worker_id: str, pid: int, **extra: object) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "worker_id": worker_id,
        "pid": pid,
        "create_time": psutil.Process(pid).create_time(),
        "hive_pid": 2**22 + 17,  # no such process: the hive that wrote it is gone
        "hive_create_time": 0.0,
        **extra,
    }
    path = state_dir / f"{worker_id}.json"
    path.write_text(json.dumps(record))
    return path


async def test_a_worker_left_by_a_dead_hive_is_stopped_and_its_record_removed(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    path = write_record(tmp_path / "workers", "worker-0rphan00", sleeper.pid)
    async with httpx.AsyncClient() as http:
        sup = supervisor(tmp_path, http)
        with narration.capture() as events:
            reaped = await sup.reap_orphans()
    assert reaped == ["worker-0rphan00"]
    sleeper.wait(5)
    assert gone(sleeper.pid) and not path.exists()
    assert [e["action"] for e in events] == ["worker_orphan"]


async def test_a_stopped_orphan_is_woken_and_stopped(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    os.kill(sleeper.pid, signal.SIGSTOP)
    write_record(tmp_path / "workers", "worker-0rphan01", sleeper.pid)
    async with httpx.AsyncClient() as http:
        assert await supervisor(tmp_path, http).reap_orphans() == ["worker-0rphan01"]
    sleeper.wait(5)


async def test_a_reused_pid_is_never_touched(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    path = write_record(tmp_path / "workers", "worker-reused00", sleeper.pid)
    record = json.loads(path.read_text())
    record["create_time"] -= 1000.0  # the recorded process started long before this one
    path.write_text(json.dumps(record))
    async with httpx.AsyncClient() as http:
        assert await supervisor(tmp_path, http).reap_orphans() == []
    assert sleeper.poll() is None and not path.exists()


async def test_a_record_of_a_hive_still_alive_is_left_alone(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    other_hive = psutil.Process(os.getppid())
    path = write_record(
        tmp_path / "workers",
        "worker-0thers00",
        sleeper.pid,
        hive_pid=other_hive.pid,
        hive_create_time=other_hive.create_time(),
    )
    async with httpx.AsyncClient() as http:
        assert await supervisor(tmp_path, http).reap_orphans() == []
    assert sleeper.poll() is None and path.exists()


async def test_unreadable_records_are_dropped(tmp_path: Path) -> None:
    state_dir = tmp_path / "workers"
    state_dir.mkdir()
    (state_dir / "worker-garbage0.json").write_text("{not json")
    (state_dir / "worker-list0000.json").write_text("[1, 2]")
    async with httpx.AsyncClient() as http:
        assert await supervisor(tmp_path, http).reap_orphans() == []
    assert list(state_dir.iterdir()) == []
