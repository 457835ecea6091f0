"""``rbee`` as a person runs it, against a real queen process (no hives, no model)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keeper_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN", "NO_COLOR")}
    env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home), RBEE_CONFIG=str(home / "config.toml"))
    return env


def wait_for_health(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the queen exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the queen did not answer /health")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rbee-home")


@pytest.fixture(scope="module")
def queen(home: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (home / "queen-test.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "queen-rbee"), "--port", str(port)], env=keeper_env(home), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for_health(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def rbee(home: Path, url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, *args],
        capture_output=True,
        text=True,
        env=keeper_env(home),
        input=stdin,
        timeout=60,
    )


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_queen_check_prints_every_step_as_its_output(home: Path, queen: str) -> None:
    run = rbee(home, queen, "queen-check")
    assert run.returncode == 0, run.stderr
    assert "ok" in run.stdout  # the result table
    assert run.stderr == ""  # no narration, and no misleading "warning:"
    job_id = json_lines(rbee(home, queen, "--json", "jobs", "list", "-n", "1").stdout)[0]["jobs"][0]["job_id"]
    logged = json_lines(rbee(home, queen, "--json", "jobs", "logs", job_id).stdout)
    bookkeeping = ("job_start", "route_job", "job_done")
    steps = [e["data"]["human"] for e in logged if e["event"] == "narration" and e["data"]["action"] not in bookkeeping]
    assert len(steps) >= 5
    shown = [line.strip() for line in run.stdout.splitlines() if line.startswith("  ")]
    assert shown == steps
    assert "warning: " not in run.stdout
    verbose = rbee(home, queen, "queen-check", "-v")
    assert "[queen] Running queen_check" in verbose.stderr and "[queen] warning: " in verbose.stderr


def test_json_prints_parseable_lines_ending_with_the_end_event(home: Path, queen: str) -> None:
    run = rbee(home, queen, "--json", "queen-check")
    assert run.returncode == 0, run.stderr
    events = json_lines(run.stdout)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert {e["event"] for e in events} >= {"narration", "progress", "result", "end"}
    assert events[-1]["event"] == "end" and events[-1]["data"]["status"] == "completed"
    assert run.stderr == ""


def test_status_shows_an_empty_cluster(home: Path, queen: str) -> None:
    run = rbee(home, queen, "status")
    assert run.returncode == 0, run.stderr
    assert "No hives." in run.stdout
    run = rbee(home, queen, "hive", "list")
    assert run.returncode == 0, run.stderr


def test_jobs_list_show_logs_and_cancel(home: Path, queen: str) -> None:
    events = json_lines(rbee(home, queen, "--json", "queen-check").stdout)
    job_id = events[-1]["data"]["job_id"]

    short = job_id.removeprefix("job-")[:8]

    listed = rbee(home, queen, "jobs", "list")
    assert listed.returncode == 0 and short in listed.stdout and job_id not in listed.stdout
    assert listed.stderr == ""
    shown = rbee(home, queen, "jobs", "show", short)
    assert shown.returncode == 0 and "queen_check" in shown.stdout and "completed" in shown.stdout
    assert json.loads(rbee(home, queen, "--json", "jobs", "show", f"job-{short}").stdout)["status"] == "completed"

    for follow in ([], ["--follow"]):
        logs = rbee(home, queen, "jobs", "logs", *follow, short)
        assert logs.returncode == 0, logs.stderr
        assert "Queen self-check passed" in logs.stdout  # the narration is what logs show
    replayed = json_lines(rbee(home, queen, "--json", "jobs", "logs", job_id).stdout)
    assert replayed == events

    cancel = rbee(home, queen, "jobs", "cancel", short[:6])
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.strip() == f"job {short} had already finished: completed"
    assert json.loads(rbee(home, queen, "--json", "jobs", "cancel", job_id).stdout)["status"] == "completed"


def test_an_unknown_job_is_one_line(home: Path, queen: str) -> None:
    run = rbee(home, queen, "jobs", "show", "job-nope")
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["rbee: no job 'job-nope' (list jobs with `rbee jobs list`)"]


def test_an_unreachable_queen_is_one_line_exit_1(home: Path) -> None:
    run = rbee(home, "http://127.0.0.1:1", "status")
    assert run.returncode == 1
    assert len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith("rbee: cannot reach the queen at http://127.0.0.1:1: connection refused")
    assert "Traceback" not in run.stderr


def test_a_bad_flag_value_exits_2(home: Path, queen: str) -> None:
    run = rbee(home, queen, "infer", "--temperature", "abc", "hi")
    assert run.returncode == 2
    assert "--temperature" in run.stderr


def test_an_out_of_range_field_is_refused_by_the_queen_with_exit_2(home: Path, queen: str) -> None:
    run = rbee(home, queen, "infer", "--temperature", "5", "hi")
    assert run.returncode == 2
    assert run.stderr == "rbee: --temperature must be at most 2\n"
    run = rbee(home, queen, "infer", "--max-tokens", "0", "hi")
    assert (run.returncode, run.stderr) == (2, "rbee: --max-tokens must be at least 1\n")


def test_infer_without_hives_fails_at_submit_with_one_line(home: Path, queen: str) -> None:
    run = rbee(home, queen, "infer", "hello")
    assert run.returncode == 1
    assert run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("rbee: ")


def test_a_hive_operation_for_an_unknown_hive_is_one_line(home: Path, queen: str) -> None:
    run = rbee(home, queen, "worker", "list", "--hive", "nowhere")
    assert run.returncode == 2  # an unknown hive is bad input
    assert len(run.stderr.splitlines()) == 1 and "nowhere" in run.stderr
