"""Clients that misbehave: hang up mid-stream, hang up while queued, read slowly; and deadlines.

Documented outcomes: with ``cancel_on_disconnect`` a vanished client cancels
its job and the worker stops within a token; without it the job runs on and can
be replayed; a queued job whose client is gone leaves the queue at once; a slow
reader gets every token, late, while the queen's memory stays bounded; a job
past its ``timeout_s`` ends ``timed_out`` and its worker stops.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from cluster import wait_for
from faults.support import MODEL, Cluster, Event, end_of, follow, kinds, still_seen_until, submit

pytestmark = pytest.mark.timeout(90)

SLOW = {"RBEE_FAKE_TOKENS": "64", "RBEE_FAKE_DELAY_MS": "50"}
FAST = {"RBEE_FAKE_TOKENS": "6000", "RBEE_FAKE_DELAY_MS": "0"}
INFER = {"operation": "infer", "model": MODEL, "prompt": "hello there", "max_tokens": 40, "hive_id": "slow"}
MANY = 5000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("clients"),
        {"slow": SLOW, "fast": FAST},
        hive_args={"fast": ("--worker-arg=--n-ctx=8192",)},
    )
    try:
        c.start()
        c.spawn("slow")
        c.spawn("fast")
        yield c
    finally:
        c.stop()


def record(cluster: Cluster, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=5).json()
    return data


def worker_jobs(cluster: Cluster, hive_id: str) -> list[dict[str, Any]]:
    [worker] = cluster.workers(hive_id)
    jobs: list[dict[str, Any]] = httpx.get(worker["url"] + "/v1/jobs", timeout=5).json()["jobs"]
    return jobs


def tokens_seen(n: int) -> Any:
    return lambda events: len(kinds(events, "token")) >= n


def test_a_client_gone_with_cancel_on_disconnect_cancels_the_job_and_stops_the_worker(cluster: Cluster) -> None:
    before = cluster.tasks()
    job_id = submit(cluster.url, INFER)

    events = follow(cluster.url, job_id, cancel_on_disconnect=True, until=tokens_seen(3))
    seen = len(kinds(events, "token"))

    wait_for(lambda: record(cluster, job_id)["status"] == "cancelled", 3)
    assert record(cluster, job_id)["error"]["message"] == "client disconnected"
    remote = worker_jobs(cluster, "slow")[0]
    assert remote["status"] == "cancelled"
    # Stopped within a token of the hang-up (plus what was in flight on the way).
    assert seen <= remote["tokens_out"] < seen + 5
    cluster.assert_settled(before)


def test_a_client_gone_without_cancel_on_disconnect_leaves_the_job_running(cluster: Cluster) -> None:
    job_id = submit(cluster.url, INFER)
    first = follow(cluster.url, job_id, until=tokens_seen(3))
    last_id = len(first)

    wait_for(lambda: record(cluster, job_id)["status"] == "completed", 10)
    # Nothing was lost: a reconnect from Last-Event-ID replays the rest, ending in the one end.
    with httpx.Client(timeout=10, headers={"Last-Event-ID": str(last_id)}) as client:
        body = client.get(f"{cluster.url}/v1/jobs/{job_id}/stream").text
    rest = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]
    indices = [t["i"] for t in kinds(first, "token")] + [d["i"] for d in rest if {"t", "i"} <= set(d)]
    assert indices == list(range(40))
    assert rest[-1]["status"] == "completed"


def test_a_queued_job_whose_client_is_gone_leaves_the_queue_at_once(cluster: Cluster) -> None:
    # One finished job gives the queue its estimate of how long a job takes.
    assert end_of(follow(cluster.url, submit(cluster.url, INFER)))["status"] == "completed"
    before = cluster.tasks()
    running = submit(cluster.url, INFER)
    follow(cluster.url, running, until=tokens_seen(1))  # it holds the only worker now
    queued = submit(cluster.url, INFER)

    def queued_with_estimate(events: list[Event]) -> bool:
        return any(p["action"] == "queue" for p in kinds(events, "progress"))

    events = follow(cluster.url, queued, cancel_on_disconnect=True, until=queued_with_estimate)
    gone = time.monotonic()

    position = [p for p in kinds(events, "progress") if p["action"] == "queue"][-1]
    assert position["done"] == 1 and position["unit"] == "position"
    assert isinstance(position["eta_s"], int | float) and 0 <= position["eta_s"] <= 5
    assert still_seen_until(lambda: bool(cluster.status()["queues"]), False, 5) - gone <= 1.0
    assert record(cluster, queued)["status"] == "cancelled"
    # The running job was never disturbed.
    assert end_of(follow(cluster.url, running))["status"] == "completed"
    cluster.assert_settled(before)


class _SmallWindow(http.client.HTTPConnection):
    """A connection with a tiny receive buffer, so the server feels the slow reader at once."""

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))


def test_a_slow_reader_gets_every_token_late_and_the_queen_memory_stays_bounded(cluster: Cluster) -> None:
    assert cluster.queen is not None
    queen = psutil.Process(cluster.queen.pid)
    before = cluster.tasks()
    rss_before = queen.memory_info().rss
    job_id = submit(cluster.url, {**INFER, "hive_id": "fast", "max_tokens": MANY})

    conn = _SmallWindow("127.0.0.1", cluster.queen_port, timeout=30)
    rss_peak = rss_before
    body = b""
    try:
        conn.request("GET", f"/v1/jobs/{job_id}/stream")
        response = conn.getresponse()
        assert response.status == 200
        while chunk := response.read(1024):
            body += chunk
            time.sleep(0.002)  # a reader far slower than the worker
            rss_peak = max(rss_peak, queen.memory_info().rss)
    finally:
        conn.close()

    frames = [f for f in body.decode().split("\n\n") if f.strip() and not f.startswith(":")]
    data = [json.loads(f.split("data: ", 1)[1]) for f in frames if "data: {" in f]
    tokens = [d for d in data if {"t", "i"} <= set(d)]
    assert [t["i"] for t in tokens] == list(range(MANY))
    assert "".join(t["t"] for t in tokens) == "".join(f"tok{i} " for i in range(MANY))
    ends = [d for d in data if "status" in d and "duration_ms" in d]
    assert len(ends) == 1 and ends[0]["status"] == "completed" and ends[0]["tokens_out"] == MANY
    assert frames[-1] == "data: [DONE]"
    # Memory: bounded by the job's own event log, not by how far the reader lags.
    assert rss_peak - rss_before < 64 * 2**20
    cluster.assert_settled(before)


def test_a_deadline_ends_the_job_timed_out_and_the_worker_stops(cluster: Cluster) -> None:
    before = cluster.tasks()
    events = follow(cluster.url, submit(cluster.url, {**INFER, "timeout_s": 0.5}))

    end = end_of(events)
    assert end["status"] == "timed_out" and end["error"]["kind"] == "timed_out", end
    assert len(kinds(events, "token")) < 40
    wait_for(lambda: worker_jobs(cluster, "slow")[0]["status"] in ("timed_out", "cancelled"), 3)
    cluster.assert_settled(before)
