"""One worker as the hive sees it: its process, address, slots and keep-alive, and what it reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from rbee.contracts.cluster import WorkerReport

__all__ = ["WorkerProcess", "int_arg"]

# The worker's /v1/ready state -> the worker state the hive reports.
_STATES = {"idle": "ready", "busy": "busy", "loading": "starting", "error": "dead"}


@dataclass
class WorkerProcess:
    """One worker this hive spawned."""

    worker_id: str
    model_id: str
    aliases: list[str]
    device: str
    url: str
    log_path: Path
    proc: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.time)
    state: str = "starting"  # starting | ready | busy | stopping | dead
    slots: int = 1
    busy_slots: int = 0
    queue: int = 0
    n_ctx: int | None = None
    current_job: str | None = None
    exit_code: int | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: The worker's own bearer token (None: the hive has none, nor has the worker).
    token: str | None = field(default=None, repr=False)
    #: Keep-alive, as the worker last said (``/v1/ready``).
    keep_alive_s: float | None = None
    idle_since: float | None = None
    unloads_at: float | None = None
    #: Resident set of the process, measured at the last refresh.
    memory_bytes: int | None = None
    #: What the hive reckoned the worker needs when it started it (file, KV, process).
    reserved_bytes: int | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def report(self) -> WorkerReport:
        return WorkerReport(
            worker_id=self.worker_id,
            model=self.model_id,
            model_aliases=list(self.aliases),
            device=self.device,
            state=self.state,
            url=self.url,
            pid=self.pid,
            slots=self.slots,
            busy_slots=self.busy_slots,
            queue=self.queue,
            n_ctx=self.n_ctx,
            started_at=self.started_at,
            current_job=self.current_job,
            keep_alive_s=self.keep_alive_s,
            idle_since=self.idle_since,
            unloads_at=self.unloads_at,
            memory_bytes=self.memory_bytes,
        )

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.busy_slots == 0 and self.queue == 0 and self.current_job is None

    def measure(self) -> None:
        """Take the process's resident set now (psutil)."""
        try:
            self.memory_bytes = int(psutil.Process(self.pid).memory_info().rss)
        except (psutil.Error, OSError):
            pass

    def describe(self) -> dict[str, Any]:
        """A report plus what an operator needs to look further (the log file)."""
        return {**self.report().model_dump(), "log_file": str(self.log_path)}

    def apply(self, ready: dict[str, Any]) -> None:
        """Take in what the worker's ``/v1/ready`` says."""
        state = ready.get("state")
        if ready.get("ready") and state not in ("busy", "error"):
            self.state = "ready"
        elif isinstance(state, str) and state in _STATES:
            self.state = _STATES[state]
        for name in ("slots", "busy_slots", "queue", "n_ctx"):
            value = ready.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, value)
        job = ready.get("current_job")
        self.current_job = job if isinstance(job, str) else None
        for name in ("keep_alive_s", "idle_since", "unloads_at"):
            value = ready.get(name)
            number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
            setattr(self, name, None if number is None else float(number))


def int_arg(args: Sequence[str], name: str, default: int | None = None) -> int | None:
    """The value of ``name`` in worker arguments (``--name=N`` or ``--name N``; the last one wins)."""
    value = default
    for i, arg in enumerate(args):
        text = arg.partition("=")[2] if arg.startswith(name + "=") else None
        if arg == name and i + 1 < len(args):
            text = args[i + 1]
        if text is not None and text.isdigit():
            value = int(text)
    return value
