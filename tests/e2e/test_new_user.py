"""The README's "Add a machine and a model" steps, run as a new user would run them, with the real model.

The commands are read from README.md and run in bash one by one, with only
what must differ in a test changed: free ports instead of 7833, 7835 and 8000,
a temporary directory instead of ``~/models``, and the worker id the previous
step printed instead of ``WORKER_ID``. The download runs on a terminal, so the
progress bar a person would see is checked too.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cluster import free_port, wait_for, wait_http

pytestmark = [pytest.mark.model, pytest.mark.timeout(600)]

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent
SECTION = "### Add a machine and a model"


def readme_steps() -> list[str]:
    text = README.read_text()
    assert SECTION in text, "the README lost its walkthrough"
    block = text.split(SECTION, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


class Person:
    """A shell with the venv on PATH, this test's data directory and ports."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "rbee-home"
        self.models = tmp / "models"
        self.queen_port = free_port()
        self.hive_port = free_port("127.0.0.2")
        self.http_port = free_port()
        # As a person runs it: none of the test session's allowances (the README says what to allow).
        unset = ("RBEE_TOKEN", "NO_COLOR", "RBEE_ALLOW_DOWNLOAD_FROM", "RBEE_MODEL_DIRS", "RBEE_ALLOW_HOSTS")
        self.env = {k: v for k, v in os.environ.items() if k not in unset}
        self.env.update(
            PATH=f"{BIN}:{os.environ.get('PATH', '')}",
            RBEE_HOME=str(self.home),
            RBEE_CONFIG=str(tmp / "config.toml"),
            RBEE_QUEEN_URL=f"http://127.0.0.1:{self.queen_port}",
            RBEE_NO_AUTOSTART="1",
        )
        self.background: list[subprocess.Popen[bytes]] = []
        self.worker_id: str | None = None

    def adapt(self, line: str) -> str:
        line = line.replace("~/models", str(self.models)).replace("8000", str(self.http_port))
        if line.startswith("rbee hive start"):
            line += f" --port {self.hive_port}"
        if "WORKER_ID" in line:
            assert self.worker_id, "the worker list step comes first"
            line = line.replace("WORKER_ID", self.worker_id)
        return line

    def run(self, line: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", line],
            capture_output=True,
            text=True,
            env=self.env,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
        )

    def start(self, line: str) -> None:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {line.removesuffix('&').strip()}"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.background.append(proc)

    def on_terminal(self, line: str, timeout_s: float = 240) -> tuple[int, str]:
        leader, follower = pty.openpty()
        try:
            proc = subprocess.Popen(
                ["bash", "-c", line], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=self.env
            )
            os.close(follower)
            screen = b""
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                ready, _, _ = select.select([leader], [], [], 0.5)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                screen += chunk
            return proc.wait(30), screen.decode(errors="replace")
        finally:
            os.close(leader)

    def cleanup(self) -> None:
        for proc in self.background:
            with_children(proc.pid, signal.SIGKILL)
            proc.wait(10)  # reaped, not left to the garbage collector
        pid_files = [self.home / "queen.pid", *self.home.glob("hives/*/hive.pid")]
        for pid_file in pid_files:
            try:
                with_children(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def with_children(pid: int, sig: int) -> None:
    try:
        proc = psutil.Process(pid)
        family = [*proc.children(recursive=True), proc]
    except psutil.Error:
        return
    for member in family:
        try:
            member.send_signal(sig)
        except psutil.Error:
            pass


@pytest.fixture
def person(tmp_path: Path) -> Iterator[Person]:
    p = Person(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


def rbee_json(person: Person, *args: str) -> list[dict]:
    run = person.run("rbee --json " + " ".join(args))
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def result(events: list[dict]) -> dict:
    return next(e["data"] for e in events if e["event"] == "result")


def test_the_readme_walkthrough_works_as_written(person: Person) -> None:
    steps = readme_steps()
    assert steps[0] == "rbee queen start" and steps[-1] == "rbee queen stop"
    seen: list[str] = []
    for step in steps:
        line = person.adapt(step)
        seen.append(step.split()[0] + " " + step.split()[1])
        if line.endswith("&"):
            person.start(line)
            wait_http(f"http://127.0.0.1:{person.http_port}/", 30)
            continue
        if step.startswith("rbee model download"):
            code, screen = person.on_terminal(line)
            assert code == 0, screen
            # The bar: the file's name, the bar itself, the size, complete.
            assert "gemma-copy.gguf" in screen and "━" in screen and re.search(r"241\.4/241\.4 MiB", screen), screen
            assert "SHA-256" not in screen or "verified" in screen
            models = result(rbee_json(person, "model", "list", "--hive", "beta"))["models"]
            assert ("gemma-copy", "tiny") in [(m["id"], m["alias"]) for m in models]
            continue
        run = person.run(line)
        assert run.returncode == 0, f"{step}\n{run.stdout}\n{run.stderr}"
        check(person, step, run)
    assert "rbee infer" in seen and "rbee hive" in seen
    assert not (person.home / "models" / "beta" / "gemma-copy.gguf").exists()


def check(person: Person, step: str, run: subprocess.CompletedProcess[str]) -> None:
    """What a person looks for after each step."""
    if step == "rbee queen start":
        assert "queen-rbee is running at" in run.stdout
    elif step.startswith("rbee hive start"):
        assert f"rbee-hive beta is running at http://127.0.0.2:{person.hive_port}" in run.stdout
        wait_for(lambda: "beta" in json.dumps(result(rbee_json(person, "hive", "list"))), 15)
    elif step == "rbee hive list":
        for part in ("beta", "localhost", "127.0.0.2", "online", "cpu ("):
            assert part in run.stdout, part
    elif step.startswith("mkdir"):
        assert (person.models / "gemma-copy.gguf").stat().st_size > 200_000_000
    elif step.startswith("rbee infer"):
        assert run.stdout.strip(), "no text was generated"
        assert "on hive beta" in run.stderr.splitlines()[-1]  # where it ran: the summary line
        assert "[queen]" not in run.stderr  # narration only with -v
    elif step.startswith("rbee worker list"):
        assert "worker-" in run.stdout
        workers = result(rbee_json(person, "worker", "list", "--hive", "beta"))["workers"]
        (worker,) = workers
        assert worker["model"] == "gemma-copy" and worker["url"].startswith("http://127.0.0.2:")
        person.worker_id = worker["worker_id"]
    elif step.startswith("rbee worker stop"):
        assert result(rbee_json(person, "worker", "list", "--hive", "beta"))["workers"] == []
    elif step.startswith("rbee model delete"):
        models = result(rbee_json(person, "model", "list", "--hive", "beta"))["models"]
        assert [m["alias"] for m in models] == ["gemma3-270m"]
    elif step.startswith("rbee hive stop"):
        assert "Stopped rbee-hive beta" in run.stdout
    elif step == "rbee queen stop":
        assert "Stopped queen-rbee" in run.stdout
