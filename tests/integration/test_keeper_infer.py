"""``rbee infer`` through a real queen and hive, with workers on the scripted fake engine."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
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
    home = tmp_path_factory.mktemp("keeper-infer")
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


def test_infer_streams_tokens_to_stdout_and_narration_to_stderr(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    run = rbee(url, env, "infer", "--max-tokens", "4", "hello there")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "tok0 tok1 tok2 tok3 "
    (summary,) = run.stderr.splitlines()  # off a terminal: no narration, no status line, the summary
    assert summary.startswith("4 tokens, ") and "hive localhost" in summary
    verbose = rbee(url, env, "-v", "infer", "--max-tokens", "4", "hello there")
    assert "[queen]" in verbose.stderr and "[worker]" in verbose.stderr

    quiet = rbee(url, env, "-q", "infer", "--max-tokens", "2", "hello")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "tok0 tok1 ", "")


def test_infer_json_ends_with_the_worker_and_hive(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    run = rbee(url, env, "--json", "infer", "--max-tokens", "3", "hello")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert [e["data"]["t"] for e in events if e["event"] == "token"] == ["tok0 ", "tok1 ", "tok2 "]
    end = events[-1]
    assert end["event"] == "end" and end["data"]["status"] == "completed"
    assert end["data"]["hive_id"] == "localhost" and end["data"]["worker_id"]


def test_ctrl_c_cancels_the_job_and_exits_130(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    proc = subprocess.Popen(
        [str(BIN / "rbee"), "--queen-url", url, "--json", "infer", "--max-tokens", "60", "hello"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "token":
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 130, err
    events = lines + [json.loads(line) for line in rest.splitlines()]
    end = events[-1]
    assert end["event"] == "end" and end["data"]["status"] == "cancelled"
    assert sum(1 for e in events if e["event"] == "token") < 60
    assert err == "rbee: cancelled\n"
    shown = json.loads(rbee(url, env, "--json", "jobs", "show", end["data"]["job_id"]).stdout)
    assert shown["status"] == "cancelled"


def test_on_a_terminal_the_summary_follows_the_text(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(BIN / "rbee"), "--queen-url", url, "infer", "--max-tokens", "3", "hello"],
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
            env=env,
        )
        os.close(follower)
        screen = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            screen += chunk
        assert proc.wait(10) == 0
    finally:
        os.close(leader)
    text = screen.decode()
    assert "tok0 tok1 tok2 \r\n" in text  # the text in one piece, its line ended
    assert "\x1b[2m" in text  # the status line and the summary dimmed
    assert "[queen]" not in text and "[worker]" not in text  # no narration without -v
    assert "3 tokens" in text and "tokens/s" in text and "first token" in text and "hive localhost" in text


def test_worker_and_model_lists_render(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    rbee(url, env, "-q", "infer", "--max-tokens", "1", "warm up")  # at least one worker exists
    workers = rbee(url, env, "worker", "list")
    assert workers.returncode == 0, workers.stderr
    assert "worker-" in workers.stdout
    models = rbee(url, env, "model", "list")
    assert models.returncode == 0, models.stderr
    assert "gemma3-270m" in models.stdout
    status = rbee(url, env, "status")
    assert status.returncode == 0 and "localhost" in status.stdout
