"""Hives on other machines: a queen on 127.0.0.1, hives on 127.0.0.2 and 127.0.0.3, all real processes.

One hive joins with ``rbee hive start`` (the keeper's daemon management), the
other with ``rbee-hive --queen-url ... --hive-id ...`` as it would on another
machine. Workers run the scripted fake engine.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from cluster import BIN, Daemon, free_port, hive, queen, wait_for

pytestmark = pytest.mark.timeout(120)

FAKE = {"RBEE_FAKE_TOKENS": "5", "RBEE_FAKE_DELAY_MS": "5"}
TOKEN = "a-cluster-token-0123456789"


@dataclass
class Cluster:
    queen: Daemon
    env: dict[str, str]
    home: Path

    def rbee(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "rbee"), "--queen-url", self.queen.url, *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=90,
        )


def keeper_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN", "NO_COLOR")}
    env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home), RBEE_CONFIG=str(home / "none.toml"), **FAKE)
    return env


def stop_started_hives(c: Cluster) -> None:
    """Whatever `rbee hive start` left running, by the pids it recorded."""
    for pid_file in (c.home / "hives").glob("*/hive.pid"):
        try:
            proc = psutil.Process(int(pid_file.read_text()))
            children = proc.children(recursive=True)
            proc.kill()
            for child in children:
                child.kill()
        except (ValueError, OSError, psutil.Error):
            pass


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    q = queen(tmp_path / "queen", free_port()).start()
    c = Cluster(q, keeper_env(tmp_path / "keeper"), tmp_path / "keeper")
    try:
        yield c
    finally:
        stop_started_hives(c)
        q.stop()


def events(run: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in run.stdout.splitlines()]


def result(run: subprocess.CompletedProcess[str]) -> dict:
    assert run.returncode == 0, run.stderr
    return next(e["data"] for e in events(run) if e["event"] == "result")


def hives(c: Cluster) -> dict[str, dict]:
    return {h["hive_id"]: h for h in result(c.rbee("--json", "hive", "list"))["hives"]}


def test_hives_on_two_addresses_join_and_run_jobs_where_asked(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    port = free_port("127.0.0.2")
    start = (
        "hive",
        "start",
        "--host",
        "127.0.0.2",
        "--port",
        str(port),
        "--hive-id",
        "beta",
        "--worker-engine",
        "fake",
    )
    started = c.rbee(*start)
    assert started.returncode == 0, started.stderr
    assert f"rbee-hive beta is running at http://127.0.0.2:{port}" in started.stdout
    assert "See it with: rbee hive list" in started.stderr  # its first heartbeat reached the queen
    assert (c.home / "hives" / "beta" / "hive.pid").exists() and (c.home / "logs" / "hive-beta.log").exists()
    assert "already running" in c.rbee(*start).stdout

    gamma = hive(
        tmp_path / "gamma", free_port("127.0.0.3"), c.queen.url, "gamma", "--worker-engine", "fake", host="127.0.0.3"
    )
    gamma.env.update(FAKE)
    gamma.start()
    try:
        wait_for(lambda: set(hives(c)) == {"beta", "gamma"}, 15)
        known = hives(c)
        assert known["beta"]["url"] == f"http://127.0.0.2:{port}" and known["gamma"]["url"].startswith(
            "http://127.0.0.3:"
        )
        for h in known.values():
            assert h["state"] == "online" and h["last_heartbeat_s_ago"] < 10
            assert h["devices"][0]["kind"] == "cpu" and "gemma3-270m" in [m.get("alias") for m in h["models"]]
        table = c.rbee("hive", "list")
        for part in ("beta", "gamma", "127.0.0.2", "127.0.0.3", "online", "cpu (", "gemma3-270m", "s ago"):
            assert part in table.stdout, part

        status = c.rbee("hive", "status", "--hive-id", "beta")
        assert status.returncode == 0, status.stderr
        assert f"http://127.0.0.2:{port}" in status.stdout and c.queen.url in status.stdout

        workers = {}
        for hive_id, host in (("beta", "127.0.0.2"), ("gamma", "127.0.0.3")):
            run = c.rbee("infer", "--hive", hive_id, "--max-tokens", "3", "hello", "--json")
            assert run.returncode == 0, run.stderr
            stream = events(run)
            end = stream[-1]["data"]
            assert end["status"] == "completed" and end["hive_id"] == hive_id
            said = [e["data"]["human"] for e in stream if e["event"] == "narration"]
            assert any(f"on hive {hive_id} (http://{host}:" in line for line in said), said
            workers[hive_id] = end["worker_id"]
        beta_workers = result(c.rbee("--json", "worker", "list", "--hive", "beta"))["workers"]
        assert [w["worker_id"] for w in beta_workers] == [workers["beta"]]
        assert beta_workers[0]["url"].startswith("http://127.0.0.2:")
        worker_pid = beta_workers[0]["pid"]
    finally:
        gamma.stop()

    stopped = c.rbee("hive", "stop")  # the only hive started here: no --hive-id needed
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith("Stopped rbee-hive beta (pid ")
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE
    assert not (c.home / "hives" / "beta" / "hive.pid").exists()
    gone = c.rbee("hive", "status", "--hive-id", "beta")
    assert gone.returncode == 1 and gone.stderr.splitlines() == [
        "rbee: rbee-hive beta is not running on this machine (start it with `rbee hive start`)"
    ]
    assert "not running" in c.rbee("hive", "stop", "--hive-id", "beta").stdout


def test_a_queen_with_a_token_takes_hives_that_have_it(cluster: Cluster, tmp_path: Path) -> None:
    q = queen(tmp_path / "secure-queen", free_port(), env={"RBEE_TOKEN": TOKEN}).start()
    try:
        c = Cluster(q, cluster.env, cluster.home)
        port = free_port("127.0.0.3")
        args = ("hive", "start", "--host", "127.0.0.3", "--port", str(port), "--hive-id", "sec", "--worker-engine")
        started = c.rbee(*args, "fake", env={"RBEE_TOKEN": TOKEN})
        assert started.returncode == 0, started.stderr
        assert "See it with" in started.stderr  # the heartbeats carry the token
        assert "sec" in hives_with_token(c)
        refused = c.rbee("hive", "list")
        assert refused.returncode == 1 and "pass --token or set RBEE_TOKEN" in refused.stderr
        run = c.rbee("--token", TOKEN, "infer", "--hive", "sec", "--max-tokens", "2", "hi")
        assert run.returncode == 0, run.stderr
        assert c.rbee("hive", "stop", "--hive-id", "sec").returncode == 0
    finally:
        stop_started_hives(cluster)
        q.stop()


def hives_with_token(c: Cluster) -> set[str]:
    run = c.rbee("--json", "hive", "list", env={"RBEE_TOKEN": TOKEN})
    return {h["hive_id"] for h in result(run)["hives"]}


def test_a_hive_reachable_from_the_network_needs_a_token(cluster: Cluster) -> None:
    run = cluster.rbee("hive", "start", "--host", "0.0.0.0", "--hive-id", "open")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        "rbee: binding 0.0.0.0 (not loopback) requires a token: pass --token or set RBEE_TOKEN"
    ]
    assert not (cluster.home / "hives" / "open" / "hive.pid").exists()


def test_a_hive_that_cannot_start_says_why_in_one_line(cluster: Cluster) -> None:
    port = free_port("127.0.0.2")
    bad = cluster.rbee("hive", "start", "--host", "127.0.0.2", "--port", str(port), "--hive-id", "bad id")
    assert bad.returncode == 2 and "hive id" in bad.stderr and len(bad.stderr.splitlines()) == 1
    unreachable = cluster.rbee("hive", "status", "--hive-id", "nobody")
    assert unreachable.returncode == 1 and len(unreachable.stderr.splitlines()) == 1


def test_hive_start_passes_keep_alive_and_memory_limit_to_the_hive(cluster: Cluster) -> None:
    c = cluster
    for bad in (("--keep-alive", "soon"), ("--keep-alive", "-5"), ("--memory-limit", "lots"), ("--memory-limit", "0")):
        refused = c.rbee("hive", "start", "--hive-id", "refused", "--worker-engine", "fake", *bad)
        assert refused.returncode == 2, (bad, refused.stderr)
        lines = refused.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("rbee: ") and bad[0] in lines[0], (bad, refused.stderr)
    assert not (c.home / "hives" / "refused" / "hive.pid").exists()

    port = free_port("127.0.0.2")
    start = ("hive", "start", "--host", "127.0.0.2", "--port", str(port), "--hive-id", "kept", "--worker-engine")
    started = c.rbee(*start, "fake", "--keep-alive", "90s", "--memory-limit", "6GiB")
    assert started.returncode == 0, started.stderr

    def status() -> dict:
        return result(c.rbee("--json", "status"))

    wait_for(lambda: any(h["hive_id"] == "kept" for h in status()["hives"]), 15)
    (kept,) = [h for h in status()["hives"] if h["hive_id"] == "kept"]
    assert kept["memory"]["limit_bytes"] == 6 * 2**30
    spawned = c.rbee("worker", "spawn", "--hive", "kept")
    assert spawned.returncode == 0, spawned.stderr
    wait_for(lambda: [w.get("keep_alive_s") for w in status()["workers"] if w["hive_id"] == "kept"] == [90], 15)
    assert c.rbee("hive", "stop", "--hive-id", "kept").returncode == 0
