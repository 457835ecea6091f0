"""Detached jobs: ``rbee infer --detach`` returns at once; ``rbee jobs logs --follow`` attaches later."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from cluster import BIN, Daemon, free_port, hive, queen, wait_for

pytestmark = pytest.mark.timeout(120)

# 60 pieces, 50 ms each: a job runs for 3 s unless --max-tokens says less.
FAKE = {"RBEE_FAKE_TOKENS": "60", "RBEE_FAKE_DELAY_MS": "50"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    home = tmp_path_factory.mktemp("keeper-detach")
    q = queen(home / "queen", free_port()).start()
    h: Daemon | None = None
    try:
        h = hive(home / "hive", free_port(), q.url, "localhost", "--worker-engine", "fake", env=FAKE).start()
        env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN", "NO_COLOR")}
        env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home / "keeper"), RBEE_CONFIG=str(home / "none.toml"))
        wait_for(lambda: "localhost" in rbee(q.url, env, "--json", "hive", "list").stdout, 15)
        yield q.url, env
    finally:
        if h is not None:
            h.stop()
        q.stop()


def rbee(url: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_detached_job_runs_on_and_is_followed_later_from_its_start(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    rbee(url, env, "-q", "infer", "--max-tokens", "1", "warm up")  # a worker is ready
    started = time.monotonic()
    detached = rbee(url, env, "infer", "--detach", "--max-tokens", "20", "tell me a story")
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip()
    assert job_id.startswith("job-") and detached.stdout == f"{job_id}\n"
    assert f"rbee jobs logs --follow {job_id.removeprefix('job-')[:8]}" in detached.stderr
    shown = json.loads(rbee(url, env, "--json", "jobs", "show", job_id).stdout)
    assert shown["status"] in ("queued", "running"), shown  # it returned before the job ended
    assert time.monotonic() - started < 30

    followed = rbee(url, env, "jobs", "logs", job_id, "--follow", "--json")
    assert followed.returncode == 0, followed.stderr
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))  # every event, from the first
    assert [e["data"]["t"] for e in events if e["event"] == "token"] == [f"tok{i} " for i in range(20)]
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "completed"

    again = rbee(url, env, "jobs", "logs", job_id)  # finished: the same replay, as text
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert "".join(f"tok{i} " for i in range(20)) in lines  # the text in one piece, on lines of its own
    assert "[queen] infer completed" in lines and again.stderr == ""


def test_a_detached_job_can_be_watched_while_it_runs_and_cancelled(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    job_id = rbee(url, env, "-q", "infer", "--detach", "story").stdout.strip()
    wait_for(lambda: '"event":"token"' in rbee(url, env, "--json", "jobs", "logs", job_id).stdout, 20)
    partial = rbee(url, env, "jobs", "logs", job_id)
    assert partial.returncode == 0
    assert "is still running; watch it to its end with: rbee jobs logs --follow" in partial.stderr
    cancelled = rbee(url, env, "jobs", "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    logs = rbee(url, env, "jobs", "logs", job_id, "--follow")
    assert logs.returncode == 1 and logs.stderr.splitlines()[-1] == "rbee: cancelled"
