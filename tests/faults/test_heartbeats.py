"""Hives that go quiet: a frozen hive (``SIGSTOP``), and one behind a slow, then cut, network.

Documented outcomes: a hive not heard from for three heartbeat intervals (6 s)
is ``stale`` and its workers are not scheduled; late heartbeats that still
arrive keep it online; when it is heard again it is used again, with the same
workers, without anyone restarting anything.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.support import (
    HEARTBEAT_S,
    MODEL,
    STALE_S,
    Cluster,
    DelayProxy,
    end_of,
    follow,
    still_seen_until,
    submit,
)

pytestmark = pytest.mark.timeout(90)

SLOW = {"RBEE_FAKE_TOKENS": "64", "RBEE_FAKE_DELAY_MS": "20"}
INFER = {"operation": "infer", "model": MODEL, "prompt": "hello there", "max_tokens": 5}
#: How long the hive waits for the queen to take one heartbeat (HttpDelivery's timeout).
DELIVERY_TIMEOUT_S = 5.0


def infer(cluster: Cluster, **fields: object) -> dict[str, object]:
    return end_of(follow(cluster.url, submit(cluster.url, {**INFER, **fields})))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, {"alpha": SLOW, "beta": SLOW})
    try:
        yield c.start()
    finally:
        c.stop()


def test_a_frozen_hive_leaves_scheduling_within_6_s_and_is_used_again_when_it_thaws(pair: Cluster) -> None:
    a = pair.spawn("alpha")
    pair.spawn("beta")
    hive = pair.hives["alpha"]
    os.kill(hive.pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        assert still_seen_until(lambda: pair.hive_state("alpha"), "stale", STALE_S + 10) - frozen <= STALE_S
        # Its worker is out of scheduling: every job goes to the other hive.
        for _ in range(3):
            end = infer(pair)
            assert end["status"] == "completed" and end["hive_id"] == "beta", end
    finally:
        os.kill(hive.pid, signal.SIGCONT)
    thawed = time.monotonic()
    assert still_seen_until(lambda: pair.hive_state("alpha"), "online", HEARTBEAT_S + 10) - thawed <= HEARTBEAT_S
    # Back, with the same worker: nothing was restarted.
    end = infer(pair, hive_id="alpha")
    assert end["status"] == "completed" and end["worker_id"] == a["worker_id"], end
    pair.assert_settled()


def test_a_hive_behind_a_slow_then_cut_network_stays_online_goes_stale_and_comes_back(tmp_path: Path) -> None:
    c = Cluster(tmp_path, {"far": SLOW})
    with DelayProxy(c.queen_port) as proxy:
        c.queen_url_for["far"] = proxy.url
        try:
            c.start()
            worker = c.spawn("far")

            # Slow: every heartbeat arrives 1.5 s late. Late is not lost: the hive stays online.
            proxy.delay_s = 1.5
            arrived = proxy.forwarded
            watch_until = time.monotonic() + 2 * STALE_S / 3 + HEARTBEAT_S
            states = set()
            while time.monotonic() < watch_until:
                states.add(c.hive_state("far"))
                time.sleep(0.25)
            assert states == {"online"}
            assert proxy.forwarded > arrived
            assert infer(c)["status"] == "completed"

            # Cut: nothing arrives. Stale within 6 s of the last heartbeat that did.
            proxy.blackhole = True
            cut = time.monotonic()
            assert still_seen_until(lambda: c.hive_state("far"), "stale", STALE_S + 10) - cut <= STALE_S
            # Nothing hangs meanwhile: a job that only this hive could run fails at once, typed.
            end = infer(c)
            assert end["status"] == "failed" and end["error"]["kind"] == "no_worker", end

            # Healed: online again by the hive's next heartbeat (one that was lost in the cut
            # times out first), with the same worker.
            proxy.blackhole = False
            proxy.delay_s = 0.0
            healed = time.monotonic()
            back = still_seen_until(lambda: c.hive_state("far"), "online", DELIVERY_TIMEOUT_S + HEARTBEAT_S + 10)
            assert back - healed <= DELIVERY_TIMEOUT_S + HEARTBEAT_S
            end = infer(c)
            assert end["status"] == "completed" and end["worker_id"] == worker["worker_id"], end
            c.assert_settled()
        finally:
            c.stop()
