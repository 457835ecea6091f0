"""``rbee model download|delete`` as a person runs them: keeper, queen and a hive on 127.0.0.2 as processes.

The models come from a local HTTP server (no internet here) that can misbehave
on request; the workers run the scripted fake engine, so the model files only
need to be real GGUF files, not real models.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster import BIN, Daemon, free_port, hive, queen, wait_for
from modelserver import ModelServer, tiny_gguf

pytestmark = pytest.mark.timeout(120)

BODY = tiny_gguf(1024 * 1024)  # 4 MiB
FAKE = {"RBEE_FAKE_TOKENS": "5", "RBEE_FAKE_DELAY_MS": "5"}


@dataclass
class Cluster:
    url: str
    env: dict[str, str]
    hive: Daemon
    server: ModelServer

    @property
    def models_dir(self) -> Path:
        return self.hive.home / "models" / "beta"

    def files(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.iterdir()) if self.models_dir.exists() else []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("download-cli")
    q = queen(home / "queen", free_port()).start()
    h: Daemon | None = None
    try:
        h = hive(
            home / "hive", free_port("127.0.0.2"), q.url, "beta", "--worker-engine", "fake", host="127.0.0.2", env=FAKE
        ).start()
        env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN", "NO_COLOR")}
        env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home / "keeper"), RBEE_CONFIG=str(home / "none.toml"))
        wait_for(lambda: "beta" in rbee(q.url, env, "--json", "hive", "list").stdout, 15)
        with ModelServer() as server:
            server.add("/tiny.gguf", BODY)
            yield Cluster(q.url, env, h, server)
    finally:
        if h is not None:
            h.stop()
        q.stop()


def rbee(url: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, *args], capture_output=True, text=True, env=env, timeout=60
    )


def run(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return rbee(c.url, c.env, *args)


def events(run: subprocess.CompletedProcess[str]) -> list[dict]:
    return [json.loads(line) for line in run.stdout.splitlines()]


def model_ids(c: Cluster) -> set[str]:
    listed = run(c, "--json", "model", "list", "--hive", "beta")
    result = next(e["data"] for e in events(listed) if e["event"] == "result")
    return {m["alias"] or m["id"] for m in result["models"]}


def one_line_error(run: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert run.returncode == code, (run.returncode, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("rbee: "), run.stderr
    assert "Traceback" not in run.stderr
    return lines[-1]


def test_download_infer_stop_and_delete(cluster: Cluster) -> None:
    c = cluster
    url = c.server.url("/tiny.gguf")
    done = run(c, "model", "download", url, "--alias", "tiny-q", "--hive", "beta", "--json")
    assert done.returncode == 0, done.stderr
    stream = events(done)
    progress = [e["data"] for e in stream if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == len(BODY)
    assert all(p["unit"] == "bytes" and "rate" in p for p in progress)
    assert stream[-1]["event"] == "end" and stream[-1]["data"]["status"] == "completed"
    assert "tiny-q" in model_ids(c)
    assert c.files() == ["tiny.gguf"]

    infer = run(c, "infer", "-m", "tiny-q", "--hive", "beta", "hello")
    assert infer.returncode == 0, infer.stderr
    assert infer.stdout.startswith("tok0 ")
    assert infer.stderr.rstrip().endswith("on hive beta")  # where it ran, in the summary

    busy = one_line_error(run(c, "model", "delete", "tiny-q", "--hive", "beta"))
    assert "in use by worker" in busy and "rbee worker stop" in busy
    listed = run(c, "--json", "worker", "list", "--hive", "beta")
    (worker_id,) = [w["worker_id"] for e in events(listed) if e["event"] == "result" for w in e["data"]["workers"]]
    assert run(c, "worker", "stop", worker_id, "--hive", "beta").returncode == 0
    deleted = run(c, "model", "delete", "tiny-q", "--hive", "beta")
    assert deleted.returncode == 0, deleted.stderr
    assert "tiny-q" not in model_ids(c)
    assert c.files() == []


def test_a_download_on_a_terminal_shows_a_progress_bar(cluster: Cluster) -> None:
    c = cluster
    c.server.add("/bar.gguf", BODY, delay_s=0.02)  # slow enough for a few redraws
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(BIN / "rbee"), "--queen-url", c.url, "model", "download", c.server.url("/bar.gguf"), "--hive", "beta"],
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=follower,
            env=c.env,
        )
        os.close(follower)
        screen = _read_all(leader, proc)
        assert proc.wait(10) == 0, screen
    finally:
        os.close(leader)
    assert "bar.gguf" in screen and "━" in screen  # the bar, labelled with the file
    assert "4.0/4.0 MiB" in screen  # ... complete
    assert "Downloaded bar" not in screen  # no narration without -v: the bar, then the model's table
    assert run(c, "model", "delete", "bar", "--hive", "beta").returncode == 0


def _read_all(fd: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> str:
    screen = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        screen += chunk
    return screen.decode(errors="replace")


def test_a_dropped_connection_is_resumed(cluster: Cluster) -> None:
    c = cluster
    c.server.add("/flaky.gguf", BODY, drop_after=1_000_000)
    done = run(c, "--json", "model", "download", c.server.url("/flaky.gguf"), "--hive", "beta")
    assert done.returncode == 0, done.stderr
    actions = [e["data"]["action"] for e in events(done) if e["event"] == "narration"]
    assert "download_retry" in actions
    assert c.server.ranges_asked("/flaky.gguf") == [None, "bytes=1000000-"]
    assert run(c, "model", "delete", "flaky", "--hive", "beta").returncode == 0


@pytest.mark.parametrize(
    ("path", "options", "expected"),
    [
        ("/page", {"body": b"<!DOCTYPE html><html>" + b"a" * 5000, "content_type": "text/html"}, "not a GGUF"),
        ("/short.gguf", {"body": BODY, "lie": -100_000}, "incomplete"),
        ("/missing.gguf", None, "404"),
    ],
)
def test_a_source_that_is_not_a_whole_model_fails_in_one_line_and_leaves_nothing(
    cluster: Cluster, path: str, options: dict | None, expected: str
) -> None:
    c = cluster
    if options is not None:
        c.server.add(path, options.pop("body"), **options)
    before = model_ids(c)
    line = one_line_error(run(c, "model", "download", c.server.url(path), "--hive", "beta"))
    assert expected in line
    assert model_ids(c) == before
    assert c.files() == []


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (("model", "download", "URL", "--hive", "nowhere"), 2, "no hive 'nowhere'"),
        (("model", "download", "URL", "--hive", "beta", "--sha256", "xyz"), 2, "--sha256"),
        (("model", "download", "not/here.gguf", "--hive", "beta"), 2, "no file 'not/here.gguf' here"),
        (("model", "download", "/no/such/file.gguf", "--hive", "beta"), 1, "only under"),
        (("model", "download", "URL", "--hive", "beta", "--alias", "gemma3-270m"), 1, "already has a model"),
        (("model", "delete", "no-such-model", "--hive", "beta"), 2, "no model 'no-such-model'"),
        (("model", "delete", "gemma3-270m", "--hive", "beta"), 2, "always available"),
        (("infer", "-m", "no-such-model", "--hive", "beta", "hi"), 2, "no-such-model"),
        (("infer", "--hive", "nowhere", "hi"), 2, "nowhere"),
        (("infer", "--max-tokens", "many", "hi"), 2, "--max-tokens"),
    ],
)
def test_bad_input_is_one_clear_line(cluster: Cluster, args: tuple[str, ...], code: int, expected: str) -> None:
    c = cluster
    args = tuple(c.server.url("/tiny.gguf") if a == "URL" else a for a in args)
    line = one_line_error(run(c, *args), code)
    assert expected in line, line
    assert c.files() == []


def test_ctrl_c_cancels_the_download_and_leaves_nothing(cluster: Cluster) -> None:
    c = cluster
    c.server.add("/slow.gguf", BODY, delay_s=0.2)  # 64 chunks: 13 s
    command = ["model", "download", c.server.url("/slow.gguf"), "--hive", "beta"]
    proc = subprocess.Popen(
        [str(BIN / "rbee"), "--queen-url", c.url, "--json", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=c.env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line)["event"] == "progress":
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 130, err
    end = json.loads(rest.splitlines()[-1])
    assert end["event"] == "end" and end["data"]["status"] == "cancelled"
    wait_for(lambda: not any(name.endswith(".part") for name in c.files()), 10)
    assert "slow" not in model_ids(c)
    assert c.files() == []
