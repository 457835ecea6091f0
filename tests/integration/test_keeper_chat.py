"""``rbee chat`` in a pseudo-terminal and piped, through a real queen and hive (fake engine).

The fake engine's chat prompt is one ``role: content`` line per turn, counted in
words, so ``tokens_in`` of each turn shows that the conversation so far was
sent. The real model's template is tested in tests/unit/test_openai_chat.py and
tests/e2e/test_openai_model.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pexpect
import pytest

from cluster import BIN, Daemon, free_port, hive, queen, wait_for

pytestmark = pytest.mark.timeout(120)

# 40 pieces, 50 ms each: an answer takes 2 s unless --max-tokens says less.
FAKE = {"RBEE_FAKE_TOKENS": "40", "RBEE_FAKE_DELAY_MS": "50"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    home = tmp_path_factory.mktemp("keeper-chat")
    q = queen(home / "queen", free_port()).start()
    h: Daemon | None = None
    try:
        h = hive(home / "hive", free_port(), q.url, "localhost", "--worker-engine", "fake", env=FAKE).start()
        env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN", "NO_COLOR")}
        env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home / "keeper"), RBEE_CONFIG=str(home / "none.toml"))
        env["TERM"] = "xterm"
        wait_for(lambda: _online(q.url), 15)
        yield q.url, env
    finally:
        if h is not None:
            h.stop()
        q.stop()


def _online(url: str) -> bool:
    run = subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, "--json", "hive", "list"], capture_output=True, text=True, timeout=30
    )
    return '"localhost"' in run.stdout


def _chat_jobs(url: str, n: int) -> list[dict[str, Any]]:
    jobs = httpx.get(f"{url}/v1/jobs", params={"limit": 50}, timeout=10).json()["jobs"]
    chats = [j for j in jobs if j.get("operation") == "infer" and "messages" in (j.get("payload") or {})]
    return sorted(chats, key=lambda j: j["created_at"])[-n:]


def _spawn(url: str, env: dict[str, str], *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        str(BIN / "rbee"),
        ["--queen-url", url, "chat", *args],
        env=env,
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 120),
    )
    child.expect_exact(">>> ")
    return child


def test_two_turns_then_bye(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    child = _spawn(url, env, "--system", "Be brief.", "--max-tokens", "3")
    child.sendline("hello there")
    child.expect_exact("tok0 tok1 tok2")
    child.expect_exact(">>> ")
    child.sendline("and again")
    child.expect_exact("tok0 tok1 tok2")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    first, second = _chat_jobs(url, 2)
    assert [m["role"] for m in first["payload"]["messages"]] == ["system", "user"]
    # The second turn carries the whole conversation: the first answer included.
    assert second["payload"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "tok0 tok1 tok2 "},
        {"role": "user", "content": "and again"},
    ]


def test_ctrl_c_stops_the_answer_and_keeps_the_session(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    child = _spawn(url, env)
    child.sendline("tell me a long story")
    child.expect_exact("tok2 ")
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(">>> ")
    (stopped,) = _chat_jobs(url, 1)
    wait_for(lambda: httpx.get(f"{url}/v1/jobs/{stopped['job_id']}", timeout=5).json()["status"] == "cancelled", 10)
    # The session goes on, with what was shown of the stopped answer in it.
    child.sendline("/clear")
    child.expect_exact("starts over")
    child.sendline("short one")
    child.expect_exact("tok0")
    child.expect_exact(">>> ")
    child.sendcontrol("d")  # Ctrl-D leaves too
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    (after_clear,) = _chat_jobs(url, 1)
    assert after_clear["payload"]["messages"] == [{"role": "user", "content": "short one"}]


def test_a_message_of_several_lines(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    child = _spawn(url, env, "--max-tokens", "1")
    child.sendline('"""')
    child.sendline("first line")
    child.sendline("second line")
    child.sendline('"""')
    child.expect_exact("tok0")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    (job,) = _chat_jobs(url, 1)
    assert job["payload"]["messages"] == [{"role": "user", "content": "first line\nsecond line"}]


def test_piped_stdin_is_one_exchange(cluster: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    url, env = cluster
    run = subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, "chat", "--max-tokens", "2"],
        input="Name three colours.\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "tok0 tok1 \n"
    (job,) = _chat_jobs(url, 1)
    assert job["payload"]["messages"] == [{"role": "user", "content": "Name three colours.\n"}]
    # An empty stdin is bad input.
    empty = subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, "chat"], input="", capture_output=True, text=True, env=env, timeout=60
    )
    assert empty.returncode == 2 and "empty" in empty.stderr


def test_infer_chat_is_one_turn(cluster: tuple[str, dict[str, str]]) -> None:
    url, env = cluster
    run = subprocess.run(
        [str(BIN / "rbee"), "--queen-url", url, "--json", "infer", "--chat", "--max-tokens", "2", "Hello"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert "".join(e["data"]["t"] for e in events if e["event"] == "token") == "tok0 tok1 "
    (job,) = _chat_jobs(url, 1)
    assert job["payload"]["messages"] == [{"role": "user", "content": "Hello"}]
