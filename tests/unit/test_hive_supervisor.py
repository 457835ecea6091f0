"""Worker processes: spawn, readiness, crashes, kill -9, stop, shutdown.

A stub worker program (written here, standard library only) stands in for
``rbee.worker.main``: it serves ``/v1/ready`` on the inherited socket and can be
told to crash, to hang while loading, or to ignore SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from rbee import narration
from rbee.errors import WorkerFailed, WorkerNotFound
from rbee.hive.addresses import reachable_host, url_host
from rbee.hive.catalog import ModelEntry
from rbee.hive.supervisor import Supervisor

STUB = textwrap.dedent(
    """
    import argparse, json, os, signal, socket, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("--fd", type=int)
    p.add_argument("--engine")
    p.add_argument("--worker-id")
    p.add_argument("--model-id")
    p.add_argument("--alias", action="append", default=[])
    args, _ = p.parse_known_args()
    print("stub worker", args.worker_id, "starting", flush=True)
    if args.engine == "crash":
        print("stub: cannot load the model", flush=True)
        sys.exit(3)
    if args.engine == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    start = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            loading = time.monotonic() - start < 0.3 or args.engine in ("hang", "stubborn")
            body = {
                "state": "loading" if loading else "idle",
                "ready": not loading,
                "slots": 2,
                "busy_slots": 0,
                "queue": 0,
                "token": os.environ.get("RBEE_TOKEN"),
                "aliases": args.alias,
                "auth": self.headers.get("Authorization"),
            }
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.serve_forever()
    """
)


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    path = tmp_path / "stub_worker.py"
    path.write_text(STUB)
    return path


@pytest.fixture
def model(tmp_path: Path) -> ModelEntry:
    return ModelEntry(
        id="tiny-q4_k_m",
        alias="tiny",
        path=str(tmp_path / "tiny.gguf"),
        size_bytes=1,
        sha256=None,
        architecture="llama",
        context_length=2048,
        quantization="Q4_K_M",
        name=None,
        source="local",
        added_at=0.0,
    )


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


def make(tmp_path: Path, stub: Path, http: httpx.AsyncClient, **kwargs) -> tuple[Supervisor, list[str]]:
    changes: list[str] = []
    options = {"engine": "fake", "ready_timeout_s": 30.0, **kwargs}
    sup = Supervisor(
        home=tmp_path / "home",
        http=http,
        command=(sys.executable, str(stub)),
        on_change=lambda: changes.append("changed"),
        **options,
    )
    return sup, changes


async def wait_until(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_spawn_waits_until_ready_and_stop_ends_the_process(tmp_path, stub, http, model) -> None:
    sup, changes = make(tmp_path, stub, http, token="t" * 20, state_dir=tmp_path / "workers")
    try:
        with narration.capture() as events:
            worker = await sup.spawn(model, aliases=["tiny", "my-name"])
        # While it runs, its pid is on record (what a restarted hive would clean up).
        [record] = sup.records()
        assert record["pid"] == worker.pid and record["worker_id"] == worker.worker_id
        assert record["hive_pid"] == os.getpid() and "token" not in record
        assert worker.worker_id.startswith("worker-") and len(worker.worker_id) == len("worker-") + 8
        assert worker.state == "ready"
        assert worker.slots == 2
        assert worker.aliases == ["tiny", "my-name"]
        actions = [e["action"] for e in events]
        assert actions[0] == "worker_spawn_start"
        assert "worker_process" in actions and "worker_loading" in actions and actions[-1] == "worker_ready"
        assert changes  # the heartbeat is poked
        # The address works, the worker got a token of its own (never the hive's), the hive authenticates.
        ready = (await http.get(f"{worker.url}/v1/ready")).json()
        assert ready["token"] == worker.token and worker.token and worker.token != "t" * 20
        assert worker.token not in worker.report().model_dump_json()
        assert ready["aliases"] == ["tiny", "my-name"]
        assert worker.log_path == tmp_path / "home" / "logs" / f"{worker.worker_id}.log"
        assert "stub worker" in worker.log_path.read_text()
        report = worker.report()
        assert report.model == "tiny-q4_k_m" and report.pid == worker.pid and report.url == worker.url
        assert sup.get(worker.worker_id) is worker

        stopped = await sup.stop(worker.worker_id)
        assert stopped.state == "dead"
        assert sup.records() == []
        assert gone(worker.pid)
        with pytest.raises(WorkerNotFound):
            sup.get(worker.worker_id)
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{worker.url}/v1/ready", timeout=2.0)
    finally:
        await sup.aclose()


async def test_a_worker_that_exits_before_ready_fails_with_its_log(tmp_path, stub, http, model) -> None:
    sup, _ = make(tmp_path, stub, http, engine="crash")
    try:
        with pytest.raises(WorkerFailed, match="exited with code 3 before it was ready") as info:
            await sup.spawn(model)
        assert "stub: cannot load the model" in info.value.message
        assert sup.all() == []
    finally:
        await sup.aclose()


async def test_kill_9_is_noticed_at_once(tmp_path, stub, http, model) -> None:
    sup, changes = make(tmp_path, stub, http)
    try:
        worker = await sup.spawn(model)
        changes.clear()
        with narration.capture() as events:
            os.kill(worker.pid, signal.SIGKILL)
            await wait_until(lambda: worker.worker_id not in sup.workers, timeout_s=5.0)
        assert worker.state == "dead"
        assert worker.exit_code == -signal.SIGKILL
        assert changes  # an immediate heartbeat
        exited = [e for e in events if e["action"] == "worker_exited"]
        assert exited and "SIGKILL" in exited[0]["human"] and exited[0]["level"] == "warn"
    finally:
        await sup.aclose()


async def test_not_ready_in_time_and_deaf_to_sigterm_is_killed(tmp_path, stub, http, model) -> None:
    sup, _ = make(tmp_path, stub, http, engine="stubborn", ready_timeout_s=1.0, stop_grace_s=0.5)
    try:
        with narration.capture() as events, pytest.raises(WorkerFailed, match="not ready within 1 s"):
            await sup.spawn(model)
        assert "worker_kill" in [e["action"] for e in events]
        assert sup.all() == []
    finally:
        await sup.aclose()


async def test_a_cancelled_spawn_leaves_no_process(tmp_path, stub, http, model) -> None:
    sup, _ = make(tmp_path, stub, http, engine="hang")
    try:
        task = asyncio.create_task(sup.spawn(model))
        await wait_until(lambda: bool(sup.workers))
        pid = next(iter(sup.workers.values())).pid
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gone(pid)
        assert sup.all() == []
    finally:
        await sup.aclose()


async def test_refresh_reads_how_busy_workers_are(tmp_path, stub, http, model) -> None:
    sup, _ = make(tmp_path, stub, http)
    try:
        worker = await sup.spawn(model)
        worker.slots = 1
        await sup.refresh()
        assert worker.slots == 2 and worker.state == "ready"
        worker.apply({"state": "busy", "ready": True, "busy_slots": 2, "queue": 3, "current_job": "job-1"})
        assert (worker.state, worker.busy_slots, worker.queue, worker.current_job) == ("busy", 2, 3, "job-1")
    finally:
        await sup.aclose()


async def test_close_stops_every_worker(tmp_path, stub, http, model) -> None:
    sup, _ = make(tmp_path, stub, http)
    workers = await asyncio.gather(sup.spawn(model), sup.spawn(model))
    assert len({w.url for w in workers}) == 2
    await sup.aclose()
    assert all(gone(w.pid) for w in workers)
    assert sup.all() == []


async def test_only_workers_of_this_hive_can_be_stopped(tmp_path, stub, http) -> None:
    sup, _ = make(tmp_path, stub, http)
    with pytest.raises(WorkerNotFound, match="no worker 'worker-deadbeef'") as info:
        await sup.stop("worker-deadbeef")
    assert info.value.status_code == 404
    await sup.aclose()


def test_addresses() -> None:
    assert reachable_host("127.0.0.1") == "127.0.0.1"
    assert reachable_host("10.1.2.3") == "10.1.2.3"
    assert reachable_host("0.0.0.0", "http://127.0.0.1:7833") == "127.0.0.1"
    assert reachable_host("0.0.0.0") not in ("0.0.0.0", "")
    assert url_host("::1") == "[::1]"
    assert url_host("example.org") == "example.org"
