"""Starting, stopping and looking at a hive process on this machine (``rbee hive start|stop|status``).

``start_hive`` runs ``python -m rbee.hive.main`` in its own session (Ctrl-C in
the keeper's terminal does not reach it), appends its output to
``$RBEE_HOME/logs/hive-<id>.log``, and once it answers ``/health`` writes
``$RBEE_HOME/hives/<id>/hive.pid`` and ``hive.json`` (its address and queen),
then waits briefly for its first heartbeat to reach the queen. A hive that joined
with an invite (``rbee hive join``) has its own credentials in
``$RBEE_HOME/hives/<id>/credentials.json`` (mode 0600): its queen and its token,
which every later start of that hive uses. Several hives
may run on one machine (one per address, as the tests do on 127.0.0.2 and
127.0.0.3); each is known by its hive id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rbee.config import HIVE_PORT, BindRefused, check_bind, rbee_home
from rbee.keeper.client import QueenClient
from rbee.keeper.daemon import alive, last_log_line, read_pid, spawn_logged, terminate
from rbee.keeper.errors import BadSetting, KeeperError

__all__ = [
    "HiveProcess",
    "StoppedHive",
    "start_hive",
    "stop_hive",
    "hive_info",
    "hive_paths",
    "Credentials",
    "read_credentials",
    "save_credentials",
    "local_hives",
    "default_hive_id",
    "pick_hive_id",
    "LOCAL_HIVE_ID",
    "HIVE_PORT",
]

START_TIMEOUT_S = 60.0
FIRST_HEARTBEAT_WAIT_S = 10.0
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class HiveProcess:
    hive_id: str
    url: str
    pid: int | None
    log: Path
    queen_url: str | None
    already_running: bool = False
    #: None: not known yet; else whether heartbeats reach the queen, and why not.
    heartbeats_ok: bool | None = None
    heartbeat_problem: str | None = None


@dataclass(frozen=True)
class StoppedHive:
    hive_id: str
    pid: int | None
    killed: bool = False
    was_running: bool = True


def default_hive_id() -> str:
    """This machine's host name, as a hive id."""
    name = re.sub(r"[^A-Za-z0-9._:-]+", "-", socket.gethostname()).strip("-.") or "hive"
    return name[:128]


def check_hive_id(hive_id: str) -> str:
    if not _ID.match(hive_id):
        raise BadSetting(f"the hive id {hive_id!r} must be 1-128 characters of letters, digits and . _ : -")
    return hive_id


def hive_paths(hive_id: str, home: Path | None = None) -> tuple[Path, Path, Path]:
    """``(pid file, state file, log file)`` of a local hive."""
    home = home or rbee_home()
    folder = home / "hives" / hive_id
    return folder / "hive.pid", folder / "hive.json", home / "logs" / f"hive-{hive_id}.log"


@dataclass(frozen=True)
class Credentials:
    """What a hive got for its invite: its name, its queen, its own token (and the queen's TLS fingerprint)."""

    hive_id: str
    queen_url: str
    token: str = field(repr=False)
    tls_fingerprint: str | None = None


def credentials_path(hive_id: str, home: Path | None = None) -> Path:
    return (home or rbee_home()) / "hives" / hive_id / "credentials.json"


def save_credentials(credentials: Credentials, home: Path | None = None) -> Path:
    """Write them with mode 0600 (created so, never widened first), replacing any before."""
    path = credentials_path(credentials.hive_id, home)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(credentials), fh)
        fh.write("\n")
    partial.replace(path)
    return path


def read_credentials(hive_id: str, home: Path | None = None) -> Credentials | None:
    """The stored credentials of a hive that joined with an invite, or None."""
    data = _read_state(credentials_path(hive_id, home))
    if not all(isinstance(data.get(k), str) for k in ("hive_id", "queen_url", "token")):
        return None
    fingerprint = data.get("tls_fingerprint")
    return Credentials(
        data["hive_id"], data["queen_url"], data["token"], fingerprint if isinstance(fingerprint, str) else None
    )


def local_hives(home: Path | None = None) -> list[str]:
    """The ids of hives started here whose process still runs."""
    home = home or rbee_home()
    found = []
    for state in sorted((home / "hives").glob("*/hive.json")):
        pid = read_pid(state.parent / "hive.pid")
        if pid is not None and alive(pid) and _is_hive(pid):
            found.append(state.parent.name)
    return found


#: The name of the hive that runs inside the queen on its machine (``queen-rbee --local-hive``),
#: and the default ``--hive`` of every command.
LOCAL_HIVE_ID = "localhost"


def pick_hive_id(given: str | None, home: Path | None = None) -> str:
    """The hive a stop or status is about: the one given, else the only one started here, else ``localhost``
    (the queen's own hive, as every ``--hive`` defaults to)."""
    if given:
        return check_hive_id(given)
    running = local_hives(home)
    if len(running) == 1:
        return running[0]
    if len(running) > 1:
        raise BadSetting(f"{len(running)} hives run here ({', '.join(running)}); say which with --hive-id")
    return LOCAL_HIVE_ID


def _is_hive(pid: int) -> bool:
    try:
        import psutil

        cmdline = " ".join(psutil.Process(pid).cmdline())
    except Exception:
        return alive(pid)
    return "rbee.hive.main" in cmdline or "rbee-hive" in cmdline


def _read_state(state_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _url(host: str, port: int) -> str:
    """Where this machine reaches a hive bound to ``host`` (a wildcard bind answers on loopback)."""
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _running(hive_id: str, home: Path | None) -> tuple[int, dict[str, Any]] | None:
    pid_file, state_file, _ = hive_paths(hive_id, home)
    pid = read_pid(pid_file)
    if pid is None or not alive(pid) or not _is_hive(pid):
        return None
    return pid, _read_state(state_file)


def start_hive(
    *,
    hive_id: str,
    queen_url: str,
    host: str = "127.0.0.1",
    port: int = HIVE_PORT,
    token: str | None = None,
    worker_engine: str | None = None,
    home: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
    extra_args: Sequence[str] = (),
    tls: str = "off",
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> HiveProcess:
    """Start a hive daemon that joins the queen at ``queen_url``, or find the one already running.

    A hive that joined with an invite reports to the queen and with the token of its credentials.
    """
    check_hive_id(hive_id)
    joined = read_credentials(hive_id, home)
    if joined is not None:
        queen_url, token = joined.queen_url, joined.token
        if joined.tls_fingerprint and tls == "off" and tls_cert is None:
            tls = "auto"  # it joined a queen that runs TLS: its own token never crosses in clear either
    pid_file, state_file, log = hive_paths(hive_id, home)
    running = _running(hive_id, home)
    if running is not None:
        pid, state = running
        return HiveProcess(
            hive_id, str(state.get("url") or "?"), pid, log, state.get("queen_url"), already_running=True
        )
    try:
        check_bind(host, token)
    except BindRefused as exc:
        raise BadSetting(str(exc)) from None
    url = _url(host, port)
    served, fingerprint = _hive_certificate(hive_id, host, home, tls, tls_cert, tls_key)
    if served is not None:
        url = "https" + url.removeprefix("http")
    with QueenClient(url, token, connect_timeout_s=1.0, fingerprint=fingerprint) as client:
        health = client.health()
        if health is not None:
            raise KeeperError(
                f"{url} already answers (as {health.get('component') or 'something'}"
                + (f" {health['hive_id']}" if health.get("hive_id") else "")
                + "); choose another --port or --host"
            )
        log.parent.mkdir(parents=True, exist_ok=True)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "rbee.hive.main", "--host", host, "--port", str(port), "--hive-id", hive_id]
        cmd += ["--queen-url", queen_url]
        if joined is not None and joined.tls_fingerprint and _hive_takes("queen_fingerprint"):
            cmd += ["--queen-fingerprint", joined.tls_fingerprint]
        if worker_engine:
            cmd += ["--worker-engine", worker_engine]
        if served is not None:
            cmd += ["--tls-cert", str(served[0]), "--tls-key", str(served[1])]
        cmd += list(extra_args)
        env = dict(os.environ)
        env.pop("RBEE_TOKEN", None)
        if token:
            env["RBEE_TOKEN"] = token  # the environment, not argv: other users can read argv
        try:
            proc = spawn_logged(cmd, log, env, "rbee hive start")
        except OSError as exc:
            raise KeeperError(f"cannot run {sys.executable}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout_s
        while client.health() is None:
            code = proc.poll()
            if code is not None:
                last = last_log_line(log) or "no output"
                raise KeeperError(f"rbee-hive exited with code {code} before it was ready: {last} (log: {log})")
            if time.monotonic() > deadline:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5.0)
                raise KeeperError(f"rbee-hive did not answer at {url} within {timeout_s:.0f} s (log: {log})")
            time.sleep(0.1)
        pid_file.write_text(f"{proc.pid}\n")
        state = {"hive_id": hive_id, "url": url, "queen_url": queen_url, "host": host, "port": port, "pid": proc.pid}
        if fingerprint is not None:
            state["tls_fingerprint"] = fingerprint
        state_file.write_text(json.dumps(state) + "\n")
        ok, problem = _first_heartbeat(client, min(FIRST_HEARTBEAT_WAIT_S, max(1.0, deadline - time.monotonic())))
    return HiveProcess(hive_id, url, proc.pid, log, queen_url, heartbeats_ok=ok, heartbeat_problem=problem)


def _hive_certificate(
    hive_id: str, host: str, home: Path | None, mode: str, cert: str | None, key: str | None
) -> tuple[tuple[Path, Path] | None, str | None]:
    """The certificate and key the hive serves with (None: plain HTTP) and their fingerprint, which
    the keeper pins to reach it. ``--tls auto`` makes them where the hive itself would."""
    if cert is not None and key is not None:
        pair = (Path(cert).resolve(), Path(key).resolve())
    elif mode == "auto":
        from rbee.daemon import auto_certificate

        try:
            pair = auto_certificate((home or rbee_home()) / "tls" / f"hive-{hive_id}", host=host)
        except ImportError:
            raise BadSetting("--tls auto needs the cryptography package (pip install cryptography)") from None
        except OSError as exc:
            raise BadSetting(f"cannot write the hive's certificate: {exc.strerror or exc}") from None
    else:
        return None, None
    from rbee.wire.tls import fingerprint_pem

    try:
        return pair, fingerprint_pem(pair[0].read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BadSetting(f"cannot read the certificate {pair[0]}: {exc}") from None


def _hive_takes(option: str) -> bool:
    """Whether rbee-hive has an option (named as its parameter), for one that newer hives add."""
    from rbee.hive.main import main

    return any(p.name == option for p in main.params)


def _first_heartbeat(client: QueenClient, timeout_s: float) -> tuple[bool | None, str | None]:
    """Whether the hive's first heartbeat reached the queen (it says so in /v1/info)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = client.info()
        except KeeperError:
            return None, None
        beats = info.get("heartbeats") or {}
        if beats.get("sent", 0) > 0:
            return True, None
        if beats.get("failing"):
            return False, "its heartbeats do not reach the queen yet (see its log)"
        time.sleep(0.1)
    return None, None


def hive_info(hive_id: str, *, token: str | None = None, home: Path | None = None) -> dict[str, Any] | None:
    """The running hive's ``/v1/info`` plus its pid and log, or None when it does not run."""
    running = _running(hive_id, home)
    if running is None:
        return None
    pid, state = running
    _, _, log = hive_paths(hive_id, home)
    info: dict[str, Any] = {"hive_id": hive_id, "url": state.get("url"), "pid": pid, "log": str(log)}
    url = state.get("url")
    if isinstance(url, str):
        pin = state.get("tls_fingerprint")
        pinned = pin if isinstance(pin, str) else None
        with QueenClient(url, token, connect_timeout_s=1.0, fingerprint=pinned) as client:
            try:
                info.update(client.info())
            except KeeperError as exc:
                info["problem"] = f"it does not answer at {url}: {exc.message}"
    info["pid"] = pid
    return info


def stop_hive(hive_id: str, *, home: Path | None = None) -> StoppedHive:
    """SIGTERM the hive (it stops its workers and says goodbye to the queen), then SIGKILL after 10 s."""
    pid_file, state_file, _ = hive_paths(hive_id, home)
    running = _running(hive_id, home)
    if running is None:
        pid_file.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)
        return StoppedHive(hive_id, None, was_running=False)
    pid, _ = running
    try:
        killed = terminate(pid, f"rbee-hive {hive_id}")
    except ProcessLookupError:
        killed = False
    if read_pid(pid_file) == pid:
        pid_file.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)
    return StoppedHive(hive_id, pid, killed=killed)
