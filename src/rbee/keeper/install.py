"""The ``install`` and ``uninstall`` commands of ``rbee hive`` and ``rbee queen`` (the units: rbee.keeper.service,
imported when a command runs: the keeper's start stays small)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from rbee.config import HIVE_PORT, rbee_home
from rbee.keeper.errors import BadSetting, KeeperError
from rbee.keeper.lifecycle import KEEP_ALIVE
from rbee.keeper.options import CONTEXT, output_options, pass_session, print_json
from rbee.keeper.session import Session
from rbee.units import parse_size

if TYPE_CHECKING:
    from rbee.keeper.service import Scope, ServiceSpec

__all__ = ["hive_install", "hive_uninstall", "queen_install", "queen_uninstall"]


def _scope_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--user/--system",
        "user",
        default=None,
        help="A unit of this user's (systemctl --user) or of the system. Default: --system as root, else --user.",
    )(f)


def _scope(user: bool | None) -> Scope:
    from rbee.keeper.service import default_scope

    return default_scope() if user is None else ("user" if user else "system")


def _finish(session: Session, spec: ServiceSpec, dry_run: bool) -> None:
    from rbee.keeper.service import install

    if dry_run:
        click.echo(spec.unit_text(), nl=False)
        where = f"would write {spec.unit_path}"
        if spec.secrets:
            where += f" and {spec.env_path} (mode 0600: {', '.join(spec.secrets)})"
        session.renderer.notice(f"{where}, then enable and start {spec.name}")
        return
    install(spec)
    if session.json_mode:
        print_json({"unit": spec.name, "path": str(spec.unit_path), "scope": spec.scope, "installed": True})
        return
    click.echo(f"Installed and started {spec.name} ({spec.scope} unit: {spec.unit_path})")
    journal = "journalctl --user" if spec.scope == "user" else "journalctl"
    session.renderer.notice(f"Its log: {journal} -u {spec.name}; remove it with the uninstall command")
    if spec.scope == "user":
        session.renderer.notice("To keep it running after you log out: loginctl enable-linger")


def _check_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("install", context_settings=CONTEXT, short_help="Run a hive here as a systemd service.")
@click.option(
    "--hive-id", metavar="NAME", help="The hive's name. Default: the one that joined here, else the host name."
)
@click.option("--host", default=None, help="Address to bind. Default: 0.0.0.0 for a joined hive, else 127.0.0.1.")
@click.option("--port", default=HIVE_PORT, show_default=True, type=click.IntRange(1, 65535), help="Port to bind.")
@click.option(
    "--queen-url", "hive_queen_url", metavar="URL", help="The queen. Default: a joined hive's, else the keeper's."
)
@click.option("--keep-alive", type=KEEP_ALIVE, default=None, metavar="DURATION", help="As `rbee hive start`.")
@click.option("--memory-limit", default=None, callback=_check_size, metavar="SIZE", help="As `rbee hive start`.")
@click.option("--worker-engine", type=click.Choice(["llama", "fake"]), default=None, hidden=True)
@click.option("--dry-run", is_flag=True, help="Print the unit; write and start nothing.")
@_scope_option
@output_options
@pass_session
def hive_install(
    session: Session,
    hive_id: str | None,
    host: str | None,
    port: int,
    hive_queen_url: str | None,
    keep_alive: float | None,
    memory_limit: int | None,
    worker_engine: str | None,
    dry_run: bool,
    user: bool | None,
) -> None:
    """Install a hive as a systemd unit (rbee-hive-NAME.service), enable and start it.

    systemd restarts it when it fails and starts it at boot; its output goes to the
    journal. A hive that joined with `rbee hive join` runs with its own credentials;
    a token is kept in an environment file with mode 0600, never in the unit.

    \b
    Examples:
      rbee hive install --dry-run
      rbee hive install --hive-id gpu-box --memory-limit 20GiB
    """
    from rbee.config import BindRefused, check_bind
    from rbee.keeper.hive_daemon import check_hive_id, default_hive_id, local_hives, read_credentials
    from rbee.keeper.service import hive_spec

    home = rbee_home()
    name = check_hive_id(hive_id) if hive_id else _joined_hive(home) or default_hive_id()
    joined = read_credentials(name, home)
    queen_url = (joined.queen_url if joined else None) or hive_queen_url or session.url
    token = joined.token if joined else session.token
    host = host or ("0.0.0.0" if joined else "127.0.0.1")
    try:
        check_bind(host, token)
    except BindRefused as exc:
        raise BadSetting(str(exc)) from None
    if not dry_run and name in local_hives(home):
        raise KeeperError(f"rbee-hive {name} runs here already; stop it first (rbee hive stop --hive-id {name})")
    extra = [f"--worker-engine={worker_engine}"] if worker_engine else []
    if joined is not None and joined.tls_fingerprint:
        extra.append(f"--queen-fingerprint={joined.tls_fingerprint}")
    if keep_alive is not None:
        extra.append(f"--keep-alive={keep_alive:g}")
    if memory_limit is not None:
        extra.append(f"--memory-limit={memory_limit}")
    spec = hive_spec(
        hive_id=name,
        queen_url=queen_url.rstrip("/"),
        host=host,
        port=port,
        token=token,
        home=home,
        scope=_scope(user),
        extra_args=extra,
    )
    _finish(session, spec, dry_run)


def _joined_hive(home: Path) -> str | None:
    """The one hive that joined with an invite here, if there is exactly one."""
    found = sorted(p.parent.name for p in (home / "hives").glob("*/credentials.json"))
    return found[0] if len(found) == 1 else None


@click.command("uninstall", context_settings=CONTEXT, short_help="Remove a hive's systemd service.")
@click.option("--hive-id", metavar="NAME", help="Which hive. Default: the one that joined here, else the host name.")
@_scope_option
@output_options
@pass_session
def hive_uninstall(session: Session, hive_id: str | None, user: bool | None) -> None:
    """Stop and disable rbee-hive-NAME.service and remove its unit and environment file.

    \b
    Examples:
      rbee hive uninstall                    # the hive that joined here
      rbee hive uninstall --hive-id beta --system
    """
    from rbee.keeper.hive_daemon import check_hive_id, default_hive_id
    from rbee.keeper.service import hive_unit_name

    name = check_hive_id(hive_id) if hive_id else _joined_hive(rbee_home()) or default_hive_id()
    _removed(session, hive_unit_name(name), user)


def _removed(session: Session, unit: str, user: bool | None) -> None:
    from rbee.keeper.service import uninstall

    scope = uninstall(unit, None if user is None else _scope(user))
    if session.json_mode:
        print_json({"unit": unit, "scope": scope, "removed": True})
    else:
        click.echo(f"Stopped and removed {unit} ({scope} unit)")


@click.command("install", context_settings=CONTEXT, short_help="Run the queen here as a systemd service.")
@click.option("--host", default=None, help="Address to bind. Default: the queen URL's host.")
@click.option(
    "--local-hive/--no-local-hive", default=True, show_default=True, help="Run this machine's hive inside it."
)
@click.option(
    "--tokens-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="As queen-rbee's: more tokens, one a line.",
)
@click.option(
    "--tls",
    "tls_mode",
    type=click.Choice(["off", "auto"]),
    default="off",
    show_default=True,
    help="As queen-rbee's: auto serves HTTPS with a certificate made once in the data directory.",
)
@click.option("--dry-run", is_flag=True, help="Print the unit; write and start nothing.")
@_scope_option
@output_options
@pass_session
def queen_install(
    session: Session,
    host: str | None,
    local_hive: bool,
    tokens_file: str | None,
    tls_mode: str,
    dry_run: bool,
    user: bool | None,
) -> None:
    """Install the queen as a systemd unit (rbee-queen.service) at the queen URL's port, enable and start it.

    The admin token (--token or RBEE_TOKEN) is kept in an environment file with
    mode 0600, never in the unit; a queen bound beyond loopback requires one.

    \b
    Examples:
      rbee queen install --dry-run
      RBEE_TOKEN=... rbee queen install --host 0.0.0.0
    """
    from rbee.config import BindRefused, check_bind
    from rbee.keeper.daemon import bind_of
    from rbee.keeper.service import queen_spec

    url_host, port = bind_of(session.url)
    host = host or url_host
    try:
        check_bind(host, session.token)
    except BindRefused as exc:
        raise BadSetting(str(exc)) from None
    if not dry_run and session.client.health() is not None:
        raise KeeperError(f"a queen answers at {session.url} already; stop it first (rbee queen stop)")
    extra = ["--local-hive" if local_hive else "--no-local-hive"]
    if tokens_file:
        extra.append(f"--tokens-file={os.path.abspath(tokens_file)}")
    if tls_mode != "off":
        extra.append(f"--tls={tls_mode}")
    spec = queen_spec(host=host, port=port, token=session.token, home=rbee_home(), scope=_scope(user), extra_args=extra)
    _finish(session, spec, dry_run)


@click.command("uninstall", context_settings=CONTEXT, short_help="Remove the queen's systemd service.")
@_scope_option
@output_options
@pass_session
def queen_uninstall(session: Session, user: bool | None) -> None:
    """Stop and disable rbee-queen.service and remove its unit and environment file.

    \b
    Examples:
      rbee queen uninstall
      rbee queen uninstall --system
    """
    from rbee.keeper.service import QUEEN_UNIT

    _removed(session, QUEEN_UNIT, user)
