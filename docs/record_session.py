"""Record a terminal session of `rbee chat` and `rbee ps` as an asciinema cast (v2).

    .venv/bin/python docs/record_session.py [--out docs/rbee-chat-and-ps.cast]

Starts a queen with its local hive on a free port in a fresh RBEE_HOME (the
bundled model, on the CPU), then types into a shell in a pseudo-terminal as a
person would: a chat of two turns, `rbee ps`, a one-shot `rbee infer` with a
keep-alive, and `rbee ps` again. Everything the terminal showed is written
with its timing; `asciinema play docs/rbee-chat-and-ps.cast` replays it, and
the same text, without the escape codes, goes to the `.txt` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pexpect

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WIDTH, HEIGHT = 100, 32


class _Cast:
    """Collects what the pseudo-terminal printed, with the time it came."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def write(self, data: str) -> None:
        self.events.append((round(time.monotonic() - self.started, 3), data))

    def flush(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _type(shell: pexpect.spawn, text: str) -> None:
    for ch in text:  # at a person's pace
        shell.send(ch)
        time.sleep(0.03)
    shell.send("\r")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "rbee-chat-and-ps.cast"))
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="rbee-cast-"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RBEE_HOME": str(home), "RBEE_QUEEN_URL": url, "RBEE_CONFIG": str(home / "none.toml")}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", TERM="xterm-256color", PS1="$ ", COLUMNS=str(WIDTH))
    env.pop("NO_COLOR", None)
    queen = subprocess.Popen(
        [str(BIN / "queen-rbee"), "--port", str(port), "--local-hive"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        cast = _Cast()
        shell = pexpect.spawn(
            "bash", ["--norc", "--noprofile"], env=env, encoding="utf-8", dimensions=(HEIGHT, WIDTH), timeout=180
        )
        shell.logfile_read = cast
        shell.expect_exact("$ ")
        _type(shell, "rbee chat --temperature 0 --max-tokens 48 --system 'You answer briefly.'")
        shell.expect_exact(">>> ")
        _type(shell, "What is the capital of France?")
        shell.expect_exact(">>> ")
        _type(shell, "And of Italy?")
        shell.expect_exact(">>> ")
        _type(shell, "/bye")
        shell.expect_exact("$ ")
        _type(shell, "rbee ps")
        shell.expect_exact("$ ")
        _type(shell, "rbee infer --keep-alive 30s --max-tokens 24 --temperature 0 'The sky is blue because'")
        shell.expect_exact("$ ")
        time.sleep(2)
        _type(shell, "rbee ps")
        shell.expect_exact("$ ")
        shell.sendline("exit")
        shell.expect(pexpect.EOF)
    finally:
        subprocess.run([str(BIN / "rbee"), "queen", "stop"], env=env, capture_output=True, timeout=60)
        queen.terminate()
        queen.wait(30)
    out = Path(args.out)
    header = {"version": 2, "width": WIDTH, "height": HEIGHT, "title": "rbee chat and rbee ps (bundled Gemma 3 270M)"}
    with out.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for at, data in cast.events:
            f.write(json.dumps([at, "o", data]) + "\n")
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r(?!\n)", "", "".join(d for _, d in cast.events)).replace("\r\n", "\n")
    out.with_suffix(".txt").write_text(plain)
    print(f"wrote {out} and {out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
