"""A real ``queen-rbee`` process: raw SSE frames on the wire, history across restarts."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster import Daemon, StallingHive, queen, wait_for

TOKEN = "process-test-token-0123456789"


@pytest.fixture
def queen_proc(tmp_path: Path, port: int) -> Iterator[Daemon]:
    daemon = queen(tmp_path / "home", port).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def submit(url: str, op: dict[str, Any], **kw: Any) -> str:
    response = httpx.post(f"{url}/v1/jobs", json=op, timeout=10, **kw)
    assert response.status_code == 201, response.text
    return str(response.json()["job_id"])


def check_wire(lines: list[str]) -> dict[str, Any]:
    """The contract, line by line: ``id:``, ``event:``, one ``data:`` of JSON, blank; then ``data: [DONE]``."""
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line == "":
            blocks.append([])
        else:
            blocks[-1].append(line)
    blocks = [b for b in blocks if b and not all(x.startswith(":") for x in b)]  # drop keep-alive comments
    assert blocks[-1] == ["data: [DONE]"]
    events = blocks[:-1]
    for n, block in enumerate(events, start=1):
        assert len(block) == 3, block
        assert block[0] == f"id: {n}"
        assert block[1].startswith("event: ")
        assert block[2].startswith("data: ")
        json.loads(block[2].removeprefix("data: "))  # one line of JSON
    kinds = [b[1].removeprefix("event: ") for b in events]
    assert kinds.count("end") == 1 and kinds[-1] == "end"
    end: dict[str, Any] = json.loads(events[-1][2].removeprefix("data: "))
    return end


def test_raw_http_client_gets_the_contracts_frames(queen_proc: Daemon) -> None:
    job_id = submit(queen_proc.url, {"operation": "queen_check"})
    lines = []
    with httpx.stream("GET", f"{queen_proc.url}/v1/jobs/{job_id}/stream", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
    # The server closes the stream itself after [DONE].
    end = check_wire(lines)
    assert end["status"] == "completed" and end["job_id"] == job_id
    narration = [json.loads(x[6:]) for x in lines if x.startswith("data: {") and '"action"' in x and '"human"' in x]
    assert {"check_nested", "check_task"} <= {n["action"] for n in narration}
    assert all(n["job_id"] == job_id for n in narration)


def test_curl_gets_the_contracts_frames(queen_proc: Daemon) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    job_id = submit(queen_proc.url, {"operation": "queen_check"})
    out = subprocess.run(
        [curl, "-sS", "-N", "--max-time", "30", f"{queen_proc.url}/v1/jobs/{job_id}/stream"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    end = check_wire(out.stdout.split("\n")[:-1])
    assert end["status"] == "completed"


def test_late_client_of_a_finished_job_gets_the_whole_stream(queen_proc: Daemon) -> None:
    job_id = submit(queen_proc.url, {"operation": "status"})
    wait_for(lambda: httpx.get(f"{queen_proc.url}/v1/jobs/{job_id}").json()["status"] == "completed")
    with httpx.stream("GET", f"{queen_proc.url}/v1/jobs/{job_id}/stream", timeout=30) as response:
        lines = list(response.iter_lines())
    assert check_wire(lines)["status"] == "completed"


def test_history_survives_a_restart(tmp_path: Path, port: int) -> None:
    home = tmp_path / "home"
    first = queen(home, port).start()
    try:
        ids = [submit(first.url, {"operation": "status"}) for _ in range(3)]
        for job_id in ids:
            wait_for(lambda j=job_id: httpx.get(f"{first.url}/v1/jobs/{j}").json()["status"] == "completed")
    finally:
        first.stop()
    second = queen(home, port).start()
    try:
        listed = httpx.get(f"{second.url}/v1/jobs", timeout=10).json()["jobs"]
        assert [j["job_id"] for j in listed] == ids[::-1]
        assert {j["status"] for j in listed} == {"completed"}
    finally:
        second.stop()


def test_job_running_when_the_queen_is_killed_is_failed_queen_restarted(tmp_path: Path, port: int) -> None:
    home = tmp_path / "home"
    hang = StallingHive().__enter__()  # a "hive" that never ends its jobs keeps the job running
    first = queen(home, port).start()
    try:
        beat = {"hive_id": "stuck", "url": hang.url}
        assert httpx.post(f"{first.url}/v1/hives/heartbeat", json=beat, timeout=10).status_code == 200
        job_id = submit(first.url, {"operation": "hive_check", "hive_id": "stuck"})
        wait_for(lambda: httpx.get(f"{first.url}/v1/jobs/{job_id}").json()["status"] == "running")
        first.kill(signal.SIGKILL)
        assert first.proc is not None
        first.proc.wait(10)
    finally:
        first.stop()
    second = queen(home, port).start()
    try:
        record = httpx.get(f"{second.url}/v1/jobs/{job_id}", timeout=10).json()
        assert record["status"] == "failed"
        assert record["error"]["kind"] == "queen_restarted"
    finally:
        second.stop()
        hang.__exit__()


def test_queen_with_a_token_refuses_requests_without_it(tmp_path: Path, port: int) -> None:
    daemon = queen(tmp_path / "home", port, "--token", TOKEN).start()
    try:
        assert httpx.get(f"{daemon.url}/v1/jobs", timeout=10).status_code == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        job_id = submit(daemon.url, {"operation": "status"}, headers=headers)
        with httpx.stream("GET", f"{daemon.url}/v1/jobs/{job_id}/stream", headers=headers, timeout=30) as response:
            assert check_wire(list(response.iter_lines()))["status"] == "completed"
    finally:
        daemon.stop()
