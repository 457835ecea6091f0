"""Real rbee processes under faults: a cluster, probes, and the "nothing left behind" check.

Every fault test starts its own queen and hives (scripted fake engine, fast
to start), does something rude to them (``kill -9``, ``SIGSTOP``, a client
that vanishes or reads slowly, heartbeats held up on the way), waits for the
documented state and then checks that nothing is left behind: no queue entry,
no live job, no asyncio task above the count before the fault, no process
that is not a listed worker, no pid record without its worker, no busy worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from httpx_sse import connect_sse

from cluster import Daemon, free_port, hive, queen, wait_for

__all__ = [
    "HEARTBEAT_S",
    "SLACK_S",
    "STALE_S",
    "WORKER_LOST_S",
    "MODEL",
    "Cluster",
    "Event",
    "DelayProxy",
    "alive",
    "submit",
    "follow",
    "still_seen_until",
    "kinds",
    "end_of",
]

#: The documented numbers (DESIGN.md): heartbeat interval, stale after three, worker_lost within 3 s.
HEARTBEAT_S = 2.0
STALE_S = 3 * HEARTBEAT_S
WORKER_LOST_S = 3.0
#: Polling adds a little to every measured time.
SLACK_S = 0.75

MODEL = "gemma3-270m"


@dataclass
class Event:
    kind: str
    data: Any
    at: float  # time.monotonic() when it arrived


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def submit(url: str, op: dict[str, Any], *, headers: dict[str, str] | None = None) -> str:
    response = httpx.post(url + "/v1/jobs", json=op, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def follow(
    url: str,
    job_id: str,
    *,
    cancel_on_disconnect: bool = False,
    until: Any = None,
    timeout_s: float = 60.0,
    headers: dict[str, str] | None = None,
) -> list[Event]:
    """Read a job's stream until ``end`` (or until ``until(events)`` is true: then hang up)."""
    params = {"cancel_on_disconnect": "true"} if cancel_on_disconnect else {}
    events: list[Event] = []
    with (
        httpx.Client(timeout=httpx.Timeout(10.0, read=timeout_s), headers=headers) as client,
        connect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/stream", params=params) as source,
    ):
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if sse.data == "[DONE]":
                break
            events.append(Event(sse.event, json.loads(sse.data), time.monotonic()))
            if until is not None and until(events):
                break
    return events


def kinds(events: list[Event], kind: str) -> list[Any]:
    return [e.data for e in events if e.kind == kind]


def end_of(events: list[Event]) -> dict[str, Any]:
    """The one ``end`` event, last in the stream."""
    ends = kinds(events, "end")
    assert len(ends) == 1, f"{len(ends)} end events"
    assert events[-1].kind == "end"
    end: dict[str, Any] = ends[0]
    return end


def still_seen_until(probe: Any, want: Any, timeout_s: float, interval_s: float = 0.1) -> float:
    """Poll ``probe()`` until it returns ``want``; return when the old state was last seen.

    That is the start of the last poll that did not yet see ``want`` (or -inf if
    the first did). The server answered that poll at or after its start, so
    "the old state was still in effect at that time" holds however slowly the
    polls themselves ran: a timing bound checked against it cannot fail
    because the machine is busy, only because the server was late.
    """
    last = float("-inf")
    deadline = time.monotonic() + timeout_s
    while True:
        started = time.monotonic()
        if probe() == want:
            return last
        last = started
        if time.monotonic() > deadline:
            raise TimeoutError(f"{probe} did not become {want!r} within {timeout_s} s")
        time.sleep(interval_s)


@dataclass
class Cluster:
    """A queen and named hives, each its own process, in ``root``."""

    root: Path
    hive_env: dict[str, dict[str, str]]
    queue_size: int = 64
    queen_args: tuple[str, ...] = ()
    queen_port: int = field(default_factory=free_port)
    hive_ports: dict[str, int] = field(default_factory=dict)
    queen: Daemon | None = None
    hives: dict[str, Daemon] = field(default_factory=dict)
    queen_url_for: dict[str, str] = field(default_factory=dict)
    hive_args: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.queen_port}"

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Cluster:
        self.start_queen()
        for hive_id in self.hive_env:
            self.start_hive(hive_id)
        wait_for(lambda: all(self.hive_state(h) == "online" for h in self.hive_env), 15)
        return self

    def start_queen(self) -> Daemon:
        args = ("--queue-size", str(self.queue_size), *self.queen_args)
        self.queen = queen(self.root / "queen", self.queen_port, *args).start()
        return self.queen

    def start_hive(self, hive_id: str) -> Daemon:
        port = self.hive_ports.setdefault(hive_id, free_port())
        queen_url = self.queen_url_for.get(hive_id, self.url)
        env = self.hive_env[hive_id]
        # One slot a worker, so that a second job queues (the scenarios here are about queues
        # and failures; slots are tested in tests/integration/test_scheduling.py).
        extra = ("--worker-engine", "fake", "--worker-arg=--slots=1", *self.hive_args.get(hive_id, ()))
        daemon = hive(self.root / hive_id, port, queen_url, hive_id, *extra, env=env)
        self.hives[hive_id] = daemon.start()
        return daemon

    def stop(self) -> None:
        for daemon in self.hives.values():
            daemon.stop()
        if self.queen is not None:
            self.queen.stop()

    # -- probes --------------------------------------------------------------

    def run(self, op: dict[str, Any]) -> list[Event]:
        return follow(self.url, submit(self.url, op), timeout_s=30)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = kinds(self.run({"operation": "status"}), "result")[0]
        return result

    def hive_state(self, hive_id: str) -> str | None:
        try:
            hives = self.status()["hives"]
        except (httpx.HTTPError, AssertionError):
            return None
        return next((h["state"] for h in hives if h["hive_id"] == hive_id), None)

    def workers(self, hive_id: str | None = None) -> list[dict[str, Any]]:
        return [w for w in self.status()["workers"] if hive_id is None or w["hive_id"] == hive_id]

    def spawn(self, hive_id: str) -> dict[str, Any]:
        events = self.run({"operation": "worker_spawn", "hive_id": hive_id, "model": MODEL})
        assert end_of(events)["status"] == "completed", end_of(events)
        worker: dict[str, Any] = kinds(events, "result")[0]["worker"]
        wait_for(lambda: any(w["worker_id"] == worker["worker_id"] for w in self.workers(hive_id)), 10)
        return worker

    def info(self, url: str) -> dict[str, Any]:
        info: dict[str, Any] = httpx.get(url + "/v1/info", timeout=5).json()
        return info

    def tasks(self) -> dict[str, int]:
        """Live asyncio tasks per process (queen and every running hive)."""
        assert self.queen is not None
        counts = {"queen": self.info(self.url)["tasks"]}
        for hive_id, daemon in self.hives.items():
            if daemon.proc is not None and daemon.proc.poll() is None:
                counts[hive_id] = self.info(daemon.url)["tasks"]
        return counts

    # -- nothing left behind -------------------------------------------------

    def leftovers(self, tasks_before: dict[str, int] | None = None) -> list[str]:
        """What is left behind now (empty when the cluster has settled)."""
        found: list[str] = []
        status = self.status()
        if status.get("queues"):
            found.append(f"queue entries: {status['queues']}")
        queen_info = self.info(self.url)
        if queen_info["jobs_live"]:
            found.append(f"queen: {queen_info['jobs_live']} live job(s)")
        for hive_id, daemon in self.hives.items():
            if daemon.proc is None or daemon.proc.poll() is not None:
                continue
            listed = {w["pid"]: w for w in status["workers"] if w["hive_id"] == hive_id}
            children = {p.pid for p in daemon.descendants() if p.status() != psutil.STATUS_ZOMBIE}
            if children != set(listed):
                found.append(f"hive {hive_id}: processes {sorted(children)} but workers {sorted(listed)}")
            records = set()
            for path in (daemon.home / "hives" / hive_id / "workers").glob("worker-*.json"):
                with contextlib.suppress(OSError, ValueError):
                    records.add(json.loads(path.read_text())["pid"])
            if records != set(listed):
                found.append(f"hive {hive_id}: pid records {sorted(records)} but workers {sorted(listed)}")
            hive_info = self.info(daemon.url)
            if hive_info["jobs_live"]:
                found.append(f"hive {hive_id}: {hive_info['jobs_live']} live job(s)")
            for pid, w in listed.items():
                try:
                    ready = httpx.get(w["url"] + "/v1/ready", timeout=2).json()
                except httpx.HTTPError as exc:
                    found.append(f"worker {w['worker_id']} (pid {pid}) does not answer: {exc}")
                    continue
                if ready["busy_slots"] or ready["queue"]:
                    found.append(f"worker {w['worker_id']}: {ready['busy_slots']} busy, {ready['queue']} queued")
        if tasks_before is not None:
            now = self.tasks()
            grown = {k: (tasks_before[k], v) for k, v in now.items() if k in tasks_before and v > tasks_before[k]}
            if grown:
                found.append(f"asyncio tasks grew (before, after): {grown}")
        return found

    def assert_settled(self, tasks_before: dict[str, int] | None = None, timeout_s: float = 10.0) -> None:
        last: list[str] = []

        def settled() -> bool:
            nonlocal last
            last = self.leftovers(tasks_before)
            return not last

        try:
            wait_for(settled, timeout_s, interval_s=0.2)
        except TimeoutError:
            raise AssertionError(f"left behind after {timeout_s:g} s: {last}") from None


class DelayProxy:
    """A TCP proxy that holds up what the client sends by ``delay_s`` (a slow network).

    Used between a hive and the queen: heartbeats arrive late. With
    ``blackhole`` set, nothing the client sends arrives at all (a partition).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay_s = 0.0
        self.blackhole = False
        self.forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        start = asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(reader, up_writer, delayed=True))
                tg.create_task(self._pipe(up_reader, writer, delayed=False))
        except* (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool) -> None:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                # The client hung up: what was held back is dropped with it, and the peer hears of it.
                raise OSError("closed")
            if delayed and self.delay_s > 0:
                await asyncio.sleep(self.delay_s)
            if delayed and self.blackhole:
                continue
            writer.write(chunk)
            await writer.drain()
            if delayed:
                self.forwarded += 1


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    box = [time.monotonic()]
    yield box
    box.append(time.monotonic() - box[0])
