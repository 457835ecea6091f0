"""Running the daemons as systemd services (rbee.keeper.service, rbee.keeper.install) and where their logs go
(rbee.narration.output). No real unit is ever installed: units are written under a temporary
XDG_CONFIG_HOME and ``SYSTEMCTL`` is a script that records what it was asked."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import IO, Any

import pytest

from cluster import BIN, free_port
from rbee.keeper.hive_daemon import Credentials, save_credentials
from rbee.narration.output import rotate, rotate_if_large, under_systemd

pytestmark = pytest.mark.timeout(60)

TOKEN = "a-secret-token-0123456789"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RBEE_TOKEN", "INVOCATION_ID", "JOURNAL_STREAM")}
    env.update(
        RBEE_HOME=str(tmp_path / "data 100%"),  # a space and a specifier: both must survive the unit's quoting
        RBEE_CONFIG=str(tmp_path / "none.toml"),
        RBEE_NO_AUTOSTART="1",
        XDG_CONFIG_HOME=str(tmp_path / "xdg"),
        SYSTEMCTL=f"{sys.executable} {tmp_path / 'systemctl.py'}",
        **extra,
    )
    return env


@pytest.fixture
def systemctl(tmp_path: Path) -> Path:
    """A fake systemctl: appends its arguments to calls.jsonl; ``show`` reports an inactive, enabled unit."""
    calls = tmp_path / "calls.jsonl"
    (tmp_path / "systemctl.py").write_text(
        textwrap.dedent(
            f"""
            import json, sys
            with open({str(calls)!r}, "a") as fh:
                fh.write(json.dumps(sys.argv[1:]) + "\\n")
            if "show" in sys.argv:
                print("ActiveState=inactive\\nSubState=dead\\nUnitFileState=enabled\\nMainPID=0")
            """
        )
    )
    return calls


def rbee(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "rbee"), *args], capture_output=True, text=True, env=env, timeout=30)


def verify(unit_text: str, name: str, where: Path) -> None:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed here")
    where.mkdir(parents=True, exist_ok=True)
    (where / name).write_text(unit_text)
    run = subprocess.run([SYSTEMD_ANALYZE, "verify", str(where / name)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


def test_hive_install_dry_run_prints_a_unit_systemd_accepts_with_the_token_kept_out(tmp_path: Path) -> None:
    env = _env(tmp_path, RBEE_TOKEN=TOKEN)
    args = ("hive", "install", "--dry-run", "--user", "--hive-id", "beta", "--host", "0.0.0.0")
    run = rbee(env, *args, "--queen-url", "http://10.1.2.3:7833", "--keep-alive", "10m")
    assert run.returncode == 0, run.stderr
    unit = run.stdout
    assert TOKEN not in unit + run.stderr
    lines = unit.splitlines()
    (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
    assert exec_start.split()[1:3] == ["-m", "rbee.hive.main"] and "--queen-url http://10.1.2.3:7833" in exec_start
    assert "--keep-alive=600" in exec_start
    assert f'Environment="RBEE_HOME={tmp_path}/data 100%%"' in lines
    assert f"WorkingDirectory={tmp_path}/data 100%%" in lines
    assert f"EnvironmentFile={tmp_path}/xdg/rbee/rbee-hive-beta.env" in lines
    assert "Restart=on-failure" in lines and "WantedBy=default.target" in lines
    assert "(mode 0600: RBEE_TOKEN)" in run.stderr
    assert not (tmp_path / "xdg").exists()  # a dry run writes nothing
    verify(unit, "rbee-hive-beta.service", tmp_path / "verify")


def test_queen_install_dry_run_is_a_system_unit_when_asked(tmp_path: Path) -> None:
    run = rbee(
        _env(tmp_path),
        "--queen-url",
        "http://127.0.0.1:9123",
        "queen",
        "install",
        "--dry-run",
        "--system",
        "--tls=auto",
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
    assert exec_start.endswith("-m rbee.queen.main --host 127.0.0.1 --port 9123 --local-hive --tls=auto")
    assert "WantedBy=multi-user.target" in lines and not any(line.startswith("EnvironmentFile") for line in lines)
    assert "/etc/systemd/system/rbee-queen.service" in run.stderr
    verify(run.stdout, "rbee-queen.service", tmp_path / "verify")


def test_a_queen_beyond_loopback_needs_a_token_to_install(tmp_path: Path) -> None:
    run = rbee(_env(tmp_path), "queen", "install", "--dry-run", "--user", "--host", "0.0.0.0")
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1 and "requires a token" in run.stderr


def test_install_writes_the_unit_and_a_private_environment_file_enables_it_and_uninstall_removes_them(
    tmp_path: Path, systemctl: Path
) -> None:
    env = _env(tmp_path, RBEE_TOKEN=TOKEN)
    run = rbee(env, "hive", "install", "--user", "--hive-id", "beta", "--host", "0.0.0.0")
    assert run.returncode == 0, run.stderr
    assert TOKEN not in run.stdout + run.stderr
    unit = tmp_path / "xdg" / "systemd" / "user" / "rbee-hive-beta.service"
    secrets = tmp_path / "xdg" / "rbee" / "rbee-hive-beta.env"
    assert TOKEN not in unit.read_text()
    assert secrets.read_text() == f"RBEE_TOKEN={TOKEN}\n" and stat.S_IMODE(secrets.stat().st_mode) == 0o600
    calls = [json.loads(line) for line in systemctl.read_text().splitlines()]
    assert calls == [["--user", "daemon-reload"], ["--user", "enable", "--now", "rbee-hive-beta.service"]]

    status = rbee(env, "hive", "status", "--hive-id", "beta")
    assert status.returncode == 1
    assert status.stderr.splitlines() == [
        "rbee: rbee-hive beta is not running on this machine;"
        " its service rbee-hive-beta.service (user unit): inactive (dead), enabled"
    ]

    removed = rbee(env, "hive", "uninstall", "--hive-id", "beta")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == "Stopped and removed rbee-hive-beta.service (user unit)"
    assert not unit.exists() and not secrets.exists()
    assert ["--user", "disable", "--now", "rbee-hive-beta.service"] in [
        json.loads(line) for line in systemctl.read_text().splitlines()
    ]
    again = rbee(env, "hive", "uninstall", "--hive-id", "beta")
    assert again.returncode == 1 and len(again.stderr.splitlines()) == 1 and "no rbee-hive-beta.service" in again.stderr


def test_a_joined_hive_installs_with_its_own_credentials(tmp_path: Path) -> None:
    env = _env(tmp_path, RBEE_TOKEN="the-admin-token-is-not-used-here")
    own = "rbh_its-own-token-0123456789"
    pin = "SHA256:" + "A" * 43
    save_credentials(Credentials("gpu-box", "https://192.168.7.1:7833", own, pin), Path(env["RBEE_HOME"]))
    run = rbee(env, "hive", "install", "--dry-run", "--user")
    assert run.returncode == 0, run.stderr
    (exec_start,) = [line for line in run.stdout.splitlines() if line.startswith("ExecStart=")]
    assert "--host 0.0.0.0" in exec_start and "--hive-id gpu-box" in exec_start
    assert "--queen-url https://192.168.7.1:7833" in exec_start and f"--queen-fingerprint={pin}" in exec_start
    assert own not in run.stdout + run.stderr and "rbee-hive-gpu-box.env" in run.stdout


# -- the daemons' logs -----------------------------------------------------------------


def _narrate(lines: int, env: dict[str, str], stderr: int | IO[Any]) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import sys
        from rbee.narration import configure_logging, narrate
        configure_logging()
        for i in range({lines}):
            narrate("tick", f"line {{i}} " + "x" * 40, level="warn" if i == 0 else "info")
        sys.stderr.write("the last raw line\\n")
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=30
    )


def test_under_systemd_the_log_is_the_journal_s_lines_with_priorities_and_no_file(tmp_path: Path) -> None:
    assert under_systemd({"INVOCATION_ID": "abc"}) and under_systemd({"JOURNAL_STREAM": "8:1234"})
    assert not under_systemd({})
    log = tmp_path / "hive.log"
    env = {**os.environ, "INVOCATION_ID": "0123abcd", "RBEE_LOG_FILE": str(log), "RBEE_LOG_MAX_BYTES": "100"}
    run = _narrate(20, env, subprocess.PIPE)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert lines[0].startswith("<4>line 0 ") and lines[1].startswith("<6>line 1 ")
    assert not any(line[3:7].isdigit() for line in lines[:-1])  # no timestamp: the journal stamps lines
    assert not log.exists()  # no file of its own, and nothing rotated

    # A hive's worker inherits the hive's environment but writes to a file of its own: timestamps stay.
    worker_log = tmp_path / "worker.log"
    with worker_log.open("ab") as fh:
        assert _narrate(1, {**env, "JOURNAL_STREAM": "8:12345"}, fh).returncode == 0
    assert worker_log.read_text()[:4].isdigit()
    journal = tmp_path / "journal"  # stands in for journald's socket: JOURNAL_STREAM names what stderr is
    journal.touch()
    named = f"{journal.stat().st_dev}:{journal.stat().st_ino}"
    with journal.open("ab") as fh:
        assert _narrate(1, {**env, "JOURNAL_STREAM": named}, fh).returncode == 0
    assert journal.read_text().startswith("<4>line 0 ")

    plain = _narrate(
        1, {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}, subprocess.PIPE
    )
    assert plain.stderr.splitlines()[0][:4].isdigit()  # an ISO timestamp first


def test_a_daemon_log_file_rotates_at_its_size_limit_keeping_its_backups(tmp_path: Path) -> None:
    log = tmp_path / "hive-beta.log"
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}
    env.update(RBEE_LOG_FILE=str(log), RBEE_LOG_MAX_BYTES="2000", RBEE_LOG_BACKUPS="2")
    with log.open("ab") as fh:
        run = _narrate(200, env, fh)
    assert run.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hive-beta.log", "hive-beta.log.1", "hive-beta.log.2"]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 2000 + 200, path
    assert log.read_text().endswith("the last raw line\n")  # what the process writes itself follows the log
    assert "line 199 " in log.read_text()


def test_the_keeper_rotates_a_large_log_before_it_starts_a_daemon_on_it(tmp_path: Path) -> None:
    log = tmp_path / "queen.log"
    log.write_text("old\n" * 10)
    assert not rotate_if_large(log, {"RBEE_LOG_MAX_BYTES": "1000"})
    assert rotate_if_large(log, {"RBEE_LOG_MAX_BYTES": "10", "RBEE_LOG_BACKUPS": "2"})
    assert not log.exists() and (tmp_path / "queen.log.1").read_text() == "old\n" * 10
    log.write_text("newer\n")
    rotate(log, 2)
    rotate(log, 2)  # nothing to move but the backups
    assert (tmp_path / "queen.log.2").read_text() == "newer\n" and not (tmp_path / "queen.log.3").exists()


def test_queen_status_shows_its_unit_when_the_queen_does_not_answer(tmp_path: Path, systemctl: Path) -> None:
    env = _env(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    installed = rbee(env, "--queen-url", url, "queen", "install", "--user")
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.startswith("Installed and started rbee-queen.service (user unit: ")
    status = rbee(env, "--queen-url", url, "queen", "status")
    assert status.returncode == 1 and len(status.stderr.splitlines()) == 1
    assert status.stderr.rstrip().endswith("(its service rbee-queen.service (user unit): inactive (dead), enabled)")
    assert rbee(env, "queen", "uninstall").returncode == 0
    assert not (tmp_path / "xdg" / "systemd" / "user" / "rbee-queen.service").exists()
