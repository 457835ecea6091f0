"""Pid records of a hive's workers, and the orphans an earlier run left behind.

Each worker's pid is recorded in the hive's state directory while it runs. A
hive that starts after a previous run died (``kill -9``, a power cut of the
process, a worker that ignored its SIGTERM) finds the records and stops every
worker still running from that run, so none is left orphaned
(:meth:`PidRecords.reap`). A record names a process by pid and start time, so
a pid the system reused is never touched, and one left by a hive still alive
is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Container
from pathlib import Path
from typing import Any

import psutil

from rbee.hive.workers import WorkerProcess
from rbee.narration import narrate

__all__ = ["PidRecords"]

_POLL_INTERVAL_S = 0.05


class PidRecords:
    """The pid records in ``state_dir`` (None: nothing is recorded), one JSON file per worker."""

    def __init__(self, state_dir: Path | None) -> None:
        self.state_dir = state_dir

    def write(self, worker: WorkerProcess) -> None:
        """Record a running worker (atomically); a failure is narrated, never raised."""
        if self.state_dir is None:
            return
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "worker_id": worker.worker_id,
                "pid": worker.pid,
                "create_time": _create_time(worker.pid),
                "hive_pid": os.getpid(),
                "hive_create_time": _create_time(os.getpid()),
                "model": worker.model_id,
                "url": worker.url,
                "started_at": worker.started_at,
            }
            path = self.state_dir / f"{worker.worker_id}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
        except OSError as exc:
            narrate("worker_record_failed", f"Cannot record worker {worker.worker_id}: {exc}", level="warn")

    def remove(self, worker_id: str) -> None:
        if self.state_dir is not None:
            _unlink(self.state_dir / f"{worker_id}.json")

    def read(self) -> list[dict[str, Any]]:
        """The records (this run's and any left by an earlier one), each with its file as ``_path``."""
        if self.state_dir is None or not self.state_dir.is_dir():
            return []
        found = []
        for path in sorted(self.state_dir.glob("worker-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                record = {}
            if not isinstance(record, dict):
                record = {}
            record["_path"] = str(path)
            found.append(record)
        return found

    async def reap(self, own: Container[str], grace_s: float) -> list[str]:
        """Stop the workers an earlier run of this hive left running; returns their ids.

        A record counts only if its process is the one recorded (same pid and
        start time, so a reused pid is never touched) and the hive that
        recorded it is gone. Records of processes that have ended are removed;
        those of ``own`` workers (this run's) are kept.
        """
        reaped = []
        for record in self.read():
            path = Path(record.pop("_path"))
            worker_id = str(record.get("worker_id", path.stem))
            if worker_id in own:
                continue  # this run's own worker
            owner = _same_process(record.get("hive_pid"), record.get("hive_create_time"))
            if owner is not None and owner.pid != os.getpid():
                continue  # another hive process, still alive, owns it
            orphan = _same_process(record.get("pid"), record.get("create_time"))
            if orphan is not None:
                narrate(
                    "worker_orphan",
                    f"Worker {worker_id} (pid {orphan.pid}) of an earlier run of this hive is still running;"
                    " stopping it",
                    level="warn",
                    actor="hive",
                    worker_id=worker_id,
                    pid=orphan.pid,
                )
                await _stop_process(orphan, grace_s)
                reaped.append(worker_id)
            _unlink(path)
        return reaped


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def _same_process(pid: Any, create_time: Any) -> psutil.Process | None:
    """The live process ``pid`` if it started at ``create_time`` (so it is the one recorded)."""
    if not isinstance(pid, int) or not isinstance(create_time, int | float) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.Error, OSError):
        return None
    return proc


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


async def _stop_process(proc: psutil.Process, grace_s: float) -> None:
    """SIGTERM (and SIGCONT, in case it is stopped) to its process group, then SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
    if await _wait_gone(proc, grace_s):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.Error):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    await _wait_gone(proc, grace_s)


async def _wait_gone(proc: psutil.Process, timeout_s: float) -> bool:
    # Not our child, so there is no exit to await: poll, bounded.
    for _ in range(max(1, int(timeout_s / _POLL_INTERVAL_S))):
        if _gone(proc):
            return True
        await asyncio.sleep(_POLL_INTERVAL_S)
    return _gone(proc)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
