"""``kill -9`` of a worker, a hive and the queen, each in the middle of a stream.

Documented outcomes (DESIGN.md): a worker lost after the first token ends a
sampled job ``failed`` / ``worker_lost`` within 3 s, and a greedy one goes on
on another worker with the next token index; a hive's workers die with it and a
restarted hive stops any its previous run left; a restarted queen marks the
interrupted jobs ``failed`` / ``queen_restarted``, keeps the finished ones and
has its hives back within one heartbeat interval.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster import wait_for
from faults.support import (
    HEARTBEAT_S,
    MODEL,
    WORKER_LOST_S,
    Cluster,
    Event,
    alive,
    end_of,
    follow,
    kinds,
    still_seen_until,
    submit,
)

pytestmark = pytest.mark.timeout(90)

# 50 ms a token: a 40-token job streams for 2 s, long enough to strike in the middle.
SLOW = {"RBEE_FAKE_TOKENS": "64", "RBEE_FAKE_DELAY_MS": "50"}
INFER = {"operation": "infer", "model": MODEL, "prompt": "hello there", "max_tokens": 40, "temperature": 0}
SAMPLED = {**INFER, "temperature": 0.7}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, {"alpha": SLOW})
    try:
        yield c.start()
    finally:
        c.stop()


def strike_after(n_tokens: int, action: object) -> tuple[object, list[float]]:
    """A ``follow(until=...)`` hook that runs ``action()`` once, after ``n_tokens`` tokens (wall time kept)."""
    struck: list[float] = []

    def until(events: list[Event]) -> bool:
        if not struck and len(kinds(events, "token")) >= n_tokens:
            struck.append(time.time())
            action()  # type: ignore[operator]
        return False

    return until, struck


def finished_at(cluster: Cluster, job_id: str) -> float:
    """When the queen ended the job (its own clock), so a busy test machine cannot blur the bound."""
    finished: float = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=5).json()["finished_at"]
    return finished


def contiguous(events: list[Event]) -> bool:
    return [t["i"] for t in kinds(events, "token")] == list(range(len(kinds(events, "token"))))


def test_kill_9_of_a_worker_mid_stream_ends_the_job_worker_lost_within_3_s(cluster: Cluster) -> None:
    worker = cluster.spawn("alpha")
    before = cluster.tasks()
    until, struck = strike_after(3, lambda: os.kill(worker["pid"], signal.SIGKILL))

    job_id = submit(cluster.url, SAMPLED)
    events = follow(cluster.url, job_id, until=until)

    end = end_of(events)
    assert end["status"] == "failed" and end["error"]["kind"] == "worker_lost", end
    assert finished_at(cluster, job_id) - struck[0] <= WORKER_LOST_S
    assert contiguous(events) and len(kinds(events, "token")) < 40
    # The hive saw its worker die and said so; nothing of it is left.
    wait_for(lambda: not cluster.workers("alpha"), 5)
    assert not alive(worker["pid"])
    cluster.assert_settled(before)
    # The cluster serves again: a new worker is started on demand.
    again = end_of(follow(cluster.url, submit(cluster.url, {**INFER, "max_tokens": 3})))
    assert again["status"] == "completed" and again["worker_id"] != worker["worker_id"]


def test_kill_9_of_the_worker_of_a_greedy_job_carries_it_over_to_another_worker(cluster: Cluster) -> None:
    worker = cluster.spawn("alpha")
    before = cluster.tasks()
    until, _ = strike_after(5, lambda: os.kill(worker["pid"], signal.SIGKILL))

    job_id = submit(cluster.url, INFER)
    events = follow(cluster.url, job_id, until=until)

    end = end_of(events)
    assert end["status"] == "completed", end
    tokens = kinds(events, "token")
    # No gap, no repeat: the scripted text, every index once, in order.
    assert contiguous(events) and len(tokens) == 40
    assert "".join(t["t"] for t in tokens) == "".join(f"tok{i} " for i in range(40))
    assert [t["ids"] for t in tokens] == [[i] for i in range(40)]
    (failover,) = end["failovers"]
    assert failover["worker_id"] == worker["worker_id"] and failover["after_tokens"] >= 5
    assert end["worker_id"] != worker["worker_id"] and end["tokens_out"] == 40
    said = [n for n in kinds(events, "narration") if n.get("action") == "infer_failover"]
    assert len(said) == 1 and said[0]["worker_id"] == worker["worker_id"]
    # The history says so too.
    record = httpx.get(f"{cluster.url}/v1/jobs/{job_id}", timeout=5).json()
    assert record["failovers"] == end["failovers"]
    wait_for(lambda: not alive(worker["pid"]), 5)
    cluster.assert_settled(before)


def test_a_greedy_job_whose_hive_died_with_its_worker_ends_worker_lost(cluster: Cluster) -> None:
    cluster.spawn("alpha")
    hive = cluster.hives["alpha"]
    until, struck = strike_after(3, lambda: hive.kill(signal.SIGKILL))

    job_id = submit(cluster.url, INFER)
    events = follow(cluster.url, job_id, until=until)

    # Nobody is left to take it over, so it ends as what happened to it, as quickly.
    end = end_of(events)
    assert end["status"] == "failed" and end["error"]["kind"] == "worker_lost", end
    assert "no other worker could take the job over" in end["error"]["message"]
    assert finished_at(cluster, job_id) - struck[0] <= WORKER_LOST_S
    assert contiguous(events)


def test_kill_9_of_a_hive_mid_stream_fails_the_job_and_leaves_no_worker(cluster: Cluster) -> None:
    worker = cluster.spawn("alpha")
    queen_tasks = {"queen": cluster.tasks()["queen"]}
    hive = cluster.hives["alpha"]
    until, struck = strike_after(3, lambda: hive.kill(signal.SIGKILL))

    job_id = submit(cluster.url, SAMPLED)
    events = follow(cluster.url, job_id, until=until)

    # The worker dies with its hive (the kernel tells it), so the job cannot finish.
    end = end_of(events)
    assert end["status"] == "failed" and end["error"]["kind"] == "worker_lost", end
    assert finished_at(cluster, job_id) - struck[0] <= WORKER_LOST_S
    assert contiguous(events)
    wait_for(lambda: not alive(worker["pid"]), 10)
    # Restarted on the same data directory, the hive comes back with no worker and no stale record.
    cluster.start_hive("alpha")
    wait_for(lambda: cluster.hive_state("alpha") == "online" and not cluster.workers("alpha"), 10)
    cluster.assert_settled(queen_tasks)
    again = end_of(follow(cluster.url, submit(cluster.url, {**INFER, "max_tokens": 3})))
    assert again["status"] == "completed" and again["hive_id"] == "alpha"


def test_a_restarted_hive_stops_the_workers_its_previous_run_left(cluster: Cluster) -> None:
    worker = cluster.spawn("alpha")
    pid = worker["pid"]
    try:
        # Frozen, the worker cannot act on the SIGTERM its hive's death sends: it outlives the hive.
        os.kill(pid, signal.SIGSTOP)
        hive = cluster.hives["alpha"]
        hive.kill(signal.SIGKILL)
        assert hive.proc is not None
        hive.proc.wait(10)
        time.sleep(0.2)
        assert alive(pid), "the orphan is there before the restart"

        restarted = cluster.start_hive("alpha")

        wait_for(lambda: not alive(pid), 10)
        assert "worker_orphan" in restarted.log()
        wait_for(lambda: cluster.hive_state("alpha") == "online" and not cluster.workers("alpha"), 10)
        cluster.assert_settled()
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_kill_9_of_the_queen_mid_stream_then_restart(cluster: Cluster) -> None:
    worker = cluster.spawn("alpha")
    finished = submit(cluster.url, {**INFER, "max_tokens": 3})
    assert end_of(follow(cluster.url, finished))["status"] == "completed"
    assert cluster.queen is not None
    queen = cluster.queen
    interrupted = submit(cluster.url, INFER)
    until, _ = strike_after(3, lambda: queen.kill(signal.SIGKILL))

    with pytest.raises(httpx.HTTPError):  # the stream breaks; it never pretends to have ended
        follow(cluster.url, interrupted, until=until)

    # The worker's stream to the queen broke, which cancels its job: it stops generating.
    ready_url = worker["url"] + "/v1/ready"
    wait_for(lambda: httpx.get(ready_url, timeout=2).json()["busy_slots"] == 0, WORKER_LOST_S)
    worker_job = httpx.get(worker["url"] + "/v1/jobs", timeout=5).json()["jobs"][0]
    assert worker_job["status"] == "cancelled" and worker_job["tokens_out"] < 40

    assert queen.proc is not None
    queen.proc.wait(10)
    cluster.start_queen()
    up = time.monotonic()
    assert still_seen_until(lambda: cluster.hive_state("alpha"), "online", HEARTBEAT_S + 10) - up <= HEARTBEAT_S
    # The interrupted job is failed/queen_restarted; the finished one is still there.
    record = httpx.get(f"{cluster.url}/v1/jobs/{interrupted}", timeout=5).json()
    assert record["status"] == "failed" and record["error"]["kind"] == "queen_restarted", record
    # ...and it replays: a narration saying what happened, then exactly one end.
    replay = end_of(follow(cluster.url, interrupted))
    assert replay["status"] == "failed" and replay["error"]["kind"] == "queen_restarted"
    assert httpx.get(f"{cluster.url}/v1/jobs/{finished}", timeout=5).json()["status"] == "completed"
    # The hive brought its worker back with it: the next job runs there, nothing was restarted.
    wait_for(lambda: any(w["worker_id"] == worker["worker_id"] for w in cluster.workers("alpha")), 5)
    again = end_of(follow(cluster.url, submit(cluster.url, {**INFER, "max_tokens": 3})))
    assert again["status"] == "completed" and again["worker_id"] == worker["worker_id"]
    cluster.assert_settled()
