"""Joining a hive with an invite, as on another machine: a queen with an admin token on 127.0.0.1,
a keeper with its own data directory and no token that joins a hive on 127.0.0.2. Real processes,
the scripted fake engine."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from cluster import BIN, Daemon, free_port, queen, wait_for
from rbee.keeper.join import decode_invite

pytestmark = pytest.mark.timeout(120)

ADMIN = "the-admin-token-0123456789"
FAKE = {"RBEE_FAKE_TOKENS": "5", "RBEE_FAKE_DELAY_MS": "5"}


@dataclass
class Machines:
    queen: Daemon
    #: The queen's machine: the keeper there has the admin token.
    here: dict[str, str]
    #: The other machine: its own data directory, no token.
    there: dict[str, str]
    there_home: Path

    def rbee(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "rbee"), "--queen-url", self.queen.url, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
        )

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.rbee(self.here, *args)

    def other(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.rbee(self.there, *args)

    def invite(self, *args: str) -> str:
        run = self.admin("hive", "invite", "--json", *args)
        assert run.returncode == 0, run.stderr
        return str(json.loads(run.stdout)["invite"])

    def hives(self) -> dict[str, dict[str, Any]]:
        run = self.admin("--json", "hive", "list")
        assert run.returncode == 0, run.stderr
        data = next(json.loads(line)["data"] for line in run.stdout.splitlines() if '"result"' in line)
        return {h["hive_id"]: h for h in data["hives"]}


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RBEE_QUEEN_URL", "RBEE_TOKEN", "NO_COLOR")}
    env.update(RBEE_NO_AUTOSTART="1", RBEE_HOME=str(home), RBEE_CONFIG=str(home / "none.toml"), **FAKE, **extra)
    return env


def _kill_started_hives(home: Path) -> None:
    for pid_file in (home / "hives").glob("*/hive.pid"):
        try:
            proc = psutil.Process(int(pid_file.read_text()))
            children = proc.children(recursive=True)
            proc.kill()
            for child in children:
                child.kill()
        except (ValueError, OSError, psutil.Error):
            pass


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Machines]:
    q = queen(tmp_path / "queen", free_port(), "--local-hive", env={"RBEE_TOKEN": ADMIN, **FAKE}).start()
    m = Machines(q, _env(tmp_path / "here", RBEE_TOKEN=ADMIN), _env(tmp_path / "there"), tmp_path / "there")
    try:
        yield m
    finally:
        _kill_started_hives(m.there_home)
        q.stop()


def test_a_hive_joins_with_an_invite_runs_a_job_and_is_revoked_by_remove(machines: Machines) -> None:
    m = machines
    invite = m.invite()
    port = free_port("127.0.0.2")
    join = ("hive", "join", invite, "--host", "127.0.0.2", "--port", str(port), "--hive-id", "beta")
    joined = m.other(*join, "--worker-engine", "fake")
    assert joined.returncode == 0, joined.stderr
    assert f"Joined the queen at {m.queen.url} as hive beta" in joined.stdout
    assert f"rbee-hive beta is running at http://127.0.0.2:{port}" in joined.stdout

    # Its own credentials, private; the admin token never reached that machine.
    stored = m.there_home / "hives" / "beta" / "credentials.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    token = json.loads(stored.read_text())["token"]
    assert token.startswith("rbh_") and token not in joined.stdout + joined.stderr
    hive_pid = int((m.there_home / "hives" / "beta" / "hive.pid").read_text())
    hive_env = psutil.Process(hive_pid).environ()
    assert hive_env.get("RBEE_TOKEN") == token and ADMIN not in json.dumps(hive_env)

    wait_for(lambda: m.hives().get("beta", {}).get("state") == "online", 15)
    run = m.admin("infer", "--hive", "beta", "--max-tokens", "3", "hello", "--json")
    assert run.returncode == 0, run.stderr
    end = [json.loads(line) for line in run.stdout.splitlines()][-1]["data"]
    assert end["status"] == "completed" and end["hive_id"] == "beta"

    # Stopped and started again, it reports with the credentials it keeps (no token given).
    assert m.other("hive", "stop", "--hive-id", "beta").returncode == 0
    wait_for(lambda: m.hives().get("beta", {}).get("state") == "offline", 15)
    restarted = m.other("hive", "start", "--host", "127.0.0.2", "--port", str(port), "--hive-id", "beta")
    assert restarted.returncode == 0, restarted.stderr
    assert "See it with: rbee hive list" in restarted.stderr  # its first heartbeat was accepted
    wait_for(lambda: m.hives().get("beta", {}).get("state") == "online", 15)

    # The invite was spent.
    again = m.other("hive", "join", invite, "--hive-id", "gamma", "--no-start")
    assert again.returncode != 0
    assert again.stderr.splitlines() == ["rbee: the invite was used already; make a new one with `rbee hive invite`"]
    assert not (m.there_home / "hives" / "gamma").exists()

    # The local hive's name is taken by a hive with the admin token.
    taken = m.other("hive", "join", m.invite(), "--hive-id", "localhost", "--no-start")
    assert taken.returncode == 1 and "is online already" in taken.stderr

    # A hive's token is not the admin token.
    as_hive = m.rbee(_env(m.there_home, RBEE_TOKEN=token), "hive", "invite")
    assert as_hive.returncode == 1 and "heartbeats" in as_hive.stderr

    removed = m.admin("hive", "remove", "beta")
    assert removed.returncode == 0, removed.stderr
    assert "Removed hive beta" in removed.stdout
    assert "beta" not in m.hives()  # dropped at once, not after missed heartbeats
    log = m.there_home / "logs" / "hive-beta.log"
    wait_for(lambda: "401" in log.read_text(errors="replace"), 15)
    time.sleep(2.5)  # another heartbeat interval: it stays out
    assert "beta" not in m.hives()
    nobody = m.admin("hive", "remove", "beta")
    assert nobody.returncode == 2 and len(nobody.stderr.splitlines()) == 1


def test_an_expired_wrong_or_damaged_invite_is_one_line_and_a_failure(machines: Machines) -> None:
    m = machines
    expired = m.invite("--ttl", "1s")
    time.sleep(1.5)
    run = m.other("hive", "join", expired, "--hive-id", "late", "--no-start")
    assert run.returncode != 0 and len(run.stderr.splitlines()) == 1
    assert run.stderr.startswith("rbee: the invite expired ")

    wrong = m.other("hive", "join", m.queen.url, "--invite", "not-the-code", "--hive-id", "wrong", "--no-start")
    assert wrong.returncode != 0
    assert wrong.stderr.splitlines() == ["rbee: the invite is not valid here (mistyped, or from another queen)"]

    damaged = m.other("hive", "join", "rbee-invite:%%%", "--no-start")
    assert damaged.returncode == 2 and len(damaged.stderr.splitlines()) == 1 and "damaged" in damaged.stderr
    assert not (m.there_home / "hives").exists()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, verify=False, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_invite_from_a_tls_queen_pins_its_certificate_on_the_other_machine(tmp_path: Path) -> None:
    port = free_port()
    args = [str(BIN / "queen-rbee"), "--host", "127.0.0.1", "--port", str(port), "--tls", "auto"]
    q = Daemon("queen", args, home=tmp_path / "queen", url=f"https://127.0.0.1:{port}", env={"RBEE_TOKEN": ADMIN})
    q.home.mkdir(parents=True)
    with open(q.log_path, "ab") as log:
        q.proc = subprocess.Popen(q.args, env=q.env, stdout=log, stderr=subprocess.STDOUT)
    there = tmp_path / "there"
    try:
        pattern = re.compile(r"certificate fingerprint (SHA256:[A-Za-z0-9+/]{43})")
        fingerprint = wait_for(lambda: (found := pattern.search(q.log())) and found.group(1), 15)
        wait_for(lambda: _answers(q.url + "/health"), 15)
        m = Machines(
            q, _env(tmp_path / "here", RBEE_TOKEN=ADMIN, RBEE_QUEEN_FINGERPRINT=fingerprint), _env(there), there
        )
        made = json.loads(m.admin("hive", "invite", "--json").stdout)
        assert made["tls_fingerprint"] == fingerprint and made["queen_url"] == q.url
        assert decode_invite(made["invite"]) == (q.url, made["code"], fingerprint)

        hive_port = free_port("127.0.0.2")
        join = ("hive", "join", made["invite"], "--host", "127.0.0.2", "--port", str(hive_port), "--hive-id", "beta")
        joined = m.other(*join, "--worker-engine", "fake")
        assert joined.returncode == 0, joined.stderr
        hive_pid = int((there / "hives" / "beta" / "hive.pid").read_text())
        cmdline = psutil.Process(hive_pid).cmdline()
        assert cmdline[cmdline.index("--queen-fingerprint") + 1] == fingerprint
        assert cmdline[cmdline.index("--queen-url") + 1] == q.url
        wait_for(lambda: m.hives().get("beta", {}).get("state") == "online", 15)
        # The joined hive serves HTTPS too: its own token never crosses in clear.
        assert "--tls-cert" in cmdline and m.hives()["beta"]["url"] == f"https://127.0.0.2:{hive_port}"
        run = m.admin("infer", "--hive", "beta", "--max-tokens", "3", "hello")
        assert run.returncode == 0, run.stderr
    finally:
        _kill_started_hives(there)
        q.stop()
