"""A real ``rbee-hive`` process spawning real workers (fake engine), heartbeating to a test receiver."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from httpx_sse import connect_sse

from cluster import Daemon, hive, wait_for
from rbee.contracts import DEFAULT_MODEL
from rbee.contracts.cluster import Heartbeat

TOKEN = "hive-process-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BUNDLED_ID = "gemma-3-270m-q4_k_m"


class Receiver:
    """Stands in for the queen's heartbeat endpoint; records every heartbeat with its arrival time."""

    def __init__(self) -> None:
        self.beats: list[tuple[float, str | None, Heartbeat]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                beat = Heartbeat.model_validate_json(body)
                with receiver.lock:
                    receiver.beats.append((time.monotonic(), self.headers.get("Authorization"), beat))
                data = json.dumps({"ok": True}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="heartbeat-receiver", daemon=True)

    def latest(self, since: float = 0.0) -> Heartbeat | None:
        with self.lock:
            fresh = [beat for at, _, beat in self.beats if at >= since]
        return fresh[-1] if fresh else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


@pytest.fixture
def hive_proc(tmp_path: Path, port: int, receiver: Receiver) -> Iterator[Daemon]:
    daemon = hive(
        tmp_path / "home",
        port,
        receiver.url,
        "it-hive",
        "--worker-engine",
        "fake",
        "--heartbeat-interval",
        "0.5",
        env={"RBEE_TOKEN": TOKEN},
    )
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def run_job(url: str, operation: dict[str, Any]) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0), headers=AUTH) as client:
        response = client.post(f"{url}/v1/jobs", json=operation)
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]
        events: list[tuple[str, Any]] = []
        with connect_sse(client, "GET", f"{url}/v1/jobs/{job_id}/stream") as source:
            for sse in source.iter_sse():
                if sse.data == "[DONE]":
                    break
                events.append((sse.event, json.loads(sse.data)))
    assert events and events[-1][0] == "end"
    return events, events[-1][1]


def result_of(events: list[tuple[str, Any]]) -> Any:
    found = [data for kind, data in events if kind == "result"]
    assert len(found) == 1
    return found[0]


def spawn(url: str, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    events, end = run_job(url, {"operation": "worker_spawn", "hive_id": "it-hive", "model": model})
    assert end["status"] == "completed", end
    assert result_of(events)["worker"] == end["worker"]
    assert "token" not in end["worker"] and end["worker_token"] not in json.dumps(result_of(events))
    actions = [data["action"] for kind, data in events if kind == "narration"]
    assert {"worker_spawn_start", "worker_process", "worker_ready"} <= set(actions)
    worker: dict[str, Any] = {**end["worker"], "token": end["worker_token"]}
    return worker


def listed(url: str) -> list[str]:
    events, end = run_job(url, {"operation": "worker_list", "hive_id": "it-hive"})
    assert end["status"] == "completed"
    return [w["worker_id"] for w in result_of(events)["workers"]]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_spawn_list_and_stop_a_real_worker(hive_proc: Daemon, receiver: Receiver) -> None:
    worker = spawn(hive_proc.url)
    assert worker["worker_id"].startswith("worker-")
    assert worker["model"] == BUNDLED_ID
    assert DEFAULT_MODEL in worker["model_aliases"]
    assert worker["state"] == "ready"
    assert worker["device"] == "cpu"
    # The address works, and the worker wants a token of its own: not the hive's. The hive
    # hands it over only in the spawn job's end event (for the queen), never in a result.
    assert httpx.get(f"{worker['url']}/health", timeout=5).status_code == 200
    assert httpx.get(f"{worker['url']}/v1/ready", timeout=5).status_code == 401
    assert httpx.get(f"{worker['url']}/v1/ready", headers=AUTH, timeout=5).status_code == 401
    own = {"Authorization": f"Bearer {worker['token']}"}
    ready = httpx.get(f"{worker['url']}/v1/ready", headers=own, timeout=5).json()
    assert ready["ready"] is True

    assert listed(hive_proc.url) == [worker["worker_id"]]
    events, end = run_job(hive_proc.url, {"operation": "worker_get", "worker_id": worker["worker_id"]})
    assert result_of(events)["worker"]["pid"] == worker["pid"]

    # The heartbeat carries the worker, with the hive's token.
    beat = wait_for(lambda: (b := receiver.latest()) is not None and b.workers and b, timeout_s=10)
    assert beat.hive_id == "it-hive"
    assert beat.url == hive_proc.url
    assert [w.worker_id for w in beat.workers] == [worker["worker_id"]]
    assert [m.id for m in beat.models] == [BUNDLED_ID]
    assert {auth for _, auth, _ in receiver.beats} == {f"Bearer {TOKEN}"}
    # ... and the worker's own token, on this authenticated channel only.
    assert beat.worker_tokens == {worker["worker_id"]: worker["token"]}

    events, end = run_job(hive_proc.url, {"operation": "worker_stop", "worker_id": worker["worker_id"]})
    assert end["status"] == "completed"
    assert result_of(events) == {"worker_id": worker["worker_id"], "stopped": True}
    assert gone(worker["pid"])
    assert listed(hive_proc.url) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{worker['url']}/health", timeout=2)


def test_kill_9_is_noticed_at_once_and_stopping_the_hive_leaves_no_worker(
    hive_proc: Daemon, receiver: Receiver
) -> None:
    doomed = spawn(hive_proc.url)
    survivor = spawn(hive_proc.url, BUNDLED_ID)
    assert survivor["model_aliases"] == [DEFAULT_MODEL]

    killed_at = time.monotonic()
    os.kill(doomed["pid"], signal.SIGKILL)
    # The next heartbeat (sent at once, not on the 0.5 s tick alone) no longer carries it.
    beat = wait_for(
        lambda: (
            (b := receiver.latest(since=killed_at)) is not None
            and doomed["worker_id"] not in {w.worker_id for w in b.workers}
            and b
        ),
        timeout_s=5,
    )
    assert survivor["worker_id"] in {w.worker_id for w in beat.workers}
    assert listed(hive_proc.url) == [survivor["worker_id"]]

    assert hive_proc.proc is not None
    stopping_at = time.monotonic()
    hive_proc.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert hive_proc.proc.wait(20) in (0, -signal.SIGTERM)
    assert "Hive it-hive stopped" in hive_proc.log()
    assert gone(survivor["pid"])
    # Its last word to the queen: no workers left.
    last = receiver.latest(since=stopping_at)
    assert last is not None and last.workers == []


def test_workers_die_with_a_hive_that_is_killed(hive_proc: Daemon) -> None:
    worker = spawn(hive_proc.url)
    hive_proc.kill(signal.SIGKILL)
    assert hive_proc.proc is not None
    hive_proc.proc.wait(10)
    # The parent-death signal reaches the worker even though nobody stopped it.
    wait_for(lambda: gone(worker["pid"]), timeout_s=10)
