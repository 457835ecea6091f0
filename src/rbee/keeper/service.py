"""``rbee hive install|uninstall`` and ``rbee queen install|uninstall``: the daemons as systemd services.

A unit runs the daemon itself (``python -m rbee.hive.main ...``, the keeper's
own interpreter), so systemd supervises the process that serves:
``Restart=on-failure``, ``KillMode=mixed`` (SIGTERM to the daemon, which stops
its workers and says goodbye, then SIGKILL to what is left after
``TimeoutStopSec``), ``RBEE_HOME`` and the data directory as its working
directory. Its output goes to the journal (the daemons see ``INVOCATION_ID``
and write no log file of their own, :mod:`rbee.narration.output`). A token
never appears in the unit: it lies in an ``EnvironmentFile`` with mode 0600.

``--user`` units (the default when not root) live in
``$XDG_CONFIG_HOME/systemd/user`` with their environment files in
``$XDG_CONFIG_HOME/rbee``; system units in ``/etc/systemd/system`` and
``/etc/rbee``. ``SYSTEMCTL`` names the ``systemctl`` to run (tests give a fake).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rbee.keeper.errors import KeeperError

__all__ = [
    "Scope",
    "ServiceSpec",
    "default_scope",
    "hive_spec",
    "queen_spec",
    "install",
    "uninstall",
    "unit_state",
    "hive_unit_name",
    "service_info",
    "describe",
    "QUEEN_UNIT",
]

Scope = Literal["user", "system"]
QUEEN_UNIT = "rbee-queen.service"
SYSTEMCTL_TIMEOUT_S = 60.0


def hive_unit_name(hive_id: str) -> str:
    # systemd allows ``:`` in unit names but needs it escaped in some tools; hive ids may hold it.
    return f"rbee-hive-{hive_id.replace(':', '-')}.service"


def default_scope() -> Scope:
    return "system" if os.geteuid() == 0 else "user"


def _config_home() -> Path:
    raw = os.environ.get("XDG_CONFIG_HOME")
    return Path(raw).expanduser() if raw else Path.home() / ".config"


def unit_dir(scope: Scope) -> Path:
    return _config_home() / "systemd" / "user" if scope == "user" else Path("/etc/systemd/system")


def env_dir(scope: Scope) -> Path:
    return _config_home() / "rbee" if scope == "user" else Path("/etc/rbee")


def _quote(arg: str) -> str:
    """One word of a unit's command line or ``Environment=`` as systemd reads it, specifiers and $ kept literal."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not any(c in arg for c in " \t\"'\\;"):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _path(path: Path) -> str:
    """A path setting (``WorkingDirectory=``...): the rest of the line, unquoted, specifiers escaped."""
    return str(path).replace("%", "%%")


def _env_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_.:/+=@" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class ServiceSpec:
    """A daemon as a unit: what it runs, its data directory, and its secrets (for the environment file)."""

    name: str
    description: str
    argv: Sequence[str]
    home: Path
    scope: Scope
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    #: What ``status`` needs to find the daemon again (its URL), kept beside the unit.
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def unit_path(self) -> Path:
        return unit_dir(self.scope) / self.name

    @property
    def env_path(self) -> Path:
        return env_dir(self.scope) / (self.name.removesuffix(".service") + ".env")

    def unit_text(self) -> str:
        lines = [
            f"# Written by `rbee {self.facts.get('component', 'hive')} install`; the uninstall command removes it.",
            "[Unit]",
            f"Description={self.description}",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            "ExecStart=" + " ".join(_quote(a) for a in self.argv),
            f"WorkingDirectory={_path(self.home)}",
            "Environment=" + _quote(f"RBEE_HOME={self.home}"),
            "Environment=PYTHONUNBUFFERED=1",
        ]
        if self.secrets:
            lines.append(f"EnvironmentFile={_path(self.env_path)}")
        lines += [
            "Restart=on-failure",
            "RestartSec=3",
            "KillMode=mixed",
            "TimeoutStopSec=20",
            "",
            "[Install]",
            "WantedBy=" + ("default.target" if self.scope == "user" else "multi-user.target"),
            "",
        ]
        return "\n".join(lines)

    def env_text(self) -> str:
        # An environment file has quotes and backslashes, but neither specifiers nor $ expansion.
        return "".join(f"{k}={_env_quote(v)}\n" for k, v in self.secrets.items())


def _python() -> str:
    return str(Path(sys.executable).absolute())


def hive_spec(
    *,
    hive_id: str,
    queen_url: str,
    host: str,
    port: int,
    token: str | None,
    home: Path,
    scope: Scope,
    extra_args: Sequence[str] = (),
) -> ServiceSpec:
    argv = [_python(), "-m", "rbee.hive.main", "--host", host, "--port", str(port), "--hive-id", hive_id]
    argv += ["--queen-url", queen_url, *extra_args]
    return ServiceSpec(
        name=hive_unit_name(hive_id),
        description=f"rbee hive {hive_id}: this machine's workers and models",
        argv=argv,
        home=home,
        scope=scope,
        secrets={"RBEE_TOKEN": token} if token else {},
        facts={"component": "hive", "hive_id": hive_id, "host": host, "port": port, "queen_url": queen_url},
    )


def queen_spec(
    *, host: str, port: int, token: str | None, home: Path, scope: Scope, extra_args: Sequence[str] = ()
) -> ServiceSpec:
    argv = [_python(), "-m", "rbee.queen.main", "--host", host, "--port", str(port), *extra_args]
    return ServiceSpec(
        name=QUEEN_UNIT,
        description="rbee queen: the cluster's job server and scheduler",
        argv=argv,
        home=home,
        scope=scope,
        secrets={"RBEE_TOKEN": token} if token else {},
        facts={"component": "queen", "host": host, "port": port},
    )


def _systemctl(scope: Scope, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = shlex.split(os.environ.get("SYSTEMCTL") or "systemctl") + (["--user"] if scope == "user" else []) + list(args)
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeeperError(f"cannot run {cmd[0]}: {getattr(exc, 'strerror', None) or exc}") from None
    if check and run.returncode != 0:
        why = (run.stderr or run.stdout).strip().splitlines()
        raise KeeperError(f"{' '.join(cmd)} failed: {why[-1] if why else f'exit {run.returncode}'}")
    return run


def _write_private(path: Path, text: str) -> None:
    """Created with mode 0600 and kept so when it existed (never readable by others, even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def _facts_path(spec_name: str, scope: Scope) -> Path:
    return env_dir(scope) / (spec_name.removesuffix(".service") + ".json")


def install(spec: ServiceSpec) -> None:
    """Write the unit (and its environment file), reload systemd, enable and start it."""
    spec.unit_path.parent.mkdir(parents=True, exist_ok=True)
    if spec.secrets:
        _write_private(spec.env_path, spec.env_text())
    else:
        spec.env_path.unlink(missing_ok=True)
    _write_private(_facts_path(spec.name, spec.scope), json.dumps({**spec.facts, "scope": spec.scope}) + "\n")
    spec.unit_path.write_text(spec.unit_text())
    spec.unit_path.chmod(0o644)
    _systemctl(spec.scope, "daemon-reload")
    _systemctl(spec.scope, "enable", "--now", spec.name)


def installed_scope(name: str) -> Scope | None:
    """Where a unit of ours is installed: the user's, else the system's, else None."""
    for scope in ("user", "system"):
        if (unit_dir(scope) / name).exists():  # type: ignore[arg-type]
            return scope  # type: ignore[return-value]
    return None


def uninstall(name: str, scope: Scope | None = None) -> Scope:
    """Stop and disable the unit, remove it and its environment file; returns where it was."""
    scope = scope or installed_scope(name)
    if scope is None or not (unit_dir(scope) / name).exists():
        raise KeeperError(f"no {name} is installed here (neither a user nor a system unit)")
    _systemctl(scope, "disable", "--now", name, check=False)
    (unit_dir(scope) / name).unlink(missing_ok=True)
    stem = name.removesuffix(".service")
    for leftover in (env_dir(scope) / f"{stem}.env", env_dir(scope) / f"{stem}.json"):
        leftover.unlink(missing_ok=True)
    _systemctl(scope, "daemon-reload", check=False)
    return scope


def unit_state(name: str) -> dict[str, Any] | None:
    """The installed unit's state (``active``, ``sub``, ``enabled``, ``pid``, and what install recorded), or None."""
    scope = installed_scope(name)
    if scope is None:
        return None
    state: dict[str, Any] = {"unit": name, "scope": scope, "path": str(unit_dir(scope) / name)}
    try:
        facts = json.loads(_facts_path(name, scope).read_text())
        state["facts"] = facts if isinstance(facts, dict) else {}
    except (OSError, ValueError):
        state["facts"] = {}
    try:
        run = _systemctl(
            scope, "show", name, "-p", "ActiveState", "-p", "SubState", "-p", "UnitFileState", "-p", "MainPID"
        )
    except KeeperError as exc:
        state["problem"] = exc.message
        return state
    shown = dict(line.partition("=")[::2] for line in run.stdout.splitlines() if "=" in line)
    state["active"] = shown.get("ActiveState") or "unknown"
    state["sub"] = shown.get("SubState") or ""
    state["enabled"] = shown.get("UnitFileState") or "unknown"
    pid = shown.get("MainPID", "0")
    state["pid"] = int(pid) if pid.isdigit() and pid != "0" else None
    return state


def service_info(name: str, *, token: str | None = None) -> dict[str, Any] | None:
    """:func:`unit_state` plus, while the unit runs, the daemon's ``/v1/info`` (``info``) where install said it is."""
    state = unit_state(name)
    if state is None or state.get("active") != "active":
        return state
    facts = state["facts"]
    host, port = facts.get("host"), facts.get("port")
    if not isinstance(host, str) or not isinstance(port, int):
        return state
    from rbee.keeper.client import QueenClient

    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    with QueenClient(url, token or _secret(name, state["scope"]), connect_timeout_s=1.0) as client:
        try:
            state["info"] = {"url": url, **client.info(), "pid": state.get("pid")}
        except KeeperError as exc:
            state["info"] = {
                "url": url,
                "pid": state.get("pid"),
                "problem": f"it does not answer at {url}: {exc.message}",
            }
    return state


def _secret(name: str, scope: Scope) -> str | None:
    """The unit's own token, from its environment file (readable here when we wrote it)."""
    try:
        lines = (env_dir(scope) / (name.removesuffix(".service") + ".env")).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key == "RBEE_TOKEN":
            return value.strip('"')
    return None


def describe(state: dict[str, Any]) -> str:
    """``rbee-hive-beta.service (user unit): active (running), enabled``."""
    where = f"{state['unit']} ({state['scope']} unit)"
    if "problem" in state:
        return f"{where}: {state['problem']}"
    sub = f" ({state['sub']})" if state.get("sub") else ""
    return f"{where}: {state['active']}{sub}, {state['enabled']}"
