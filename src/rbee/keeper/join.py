"""``rbee hive invite``, ``rbee hive join`` and ``rbee hive remove``: another machine's hive, without the admin token.

``invite`` (on the queen's machine, with the admin token) asks the queen for a
one-time code and prints one string that carries it, the queen's URL and, when
the queen runs TLS, its certificate fingerprint. ``join`` (on the other
machine) spends it at the queen's ``POST /v1/hives/join`` for the hive's own
token, keeps that in the hive's credentials (mode 0600, see
:mod:`rbee.keeper.hive_daemon`) and starts the hive with them. ``remove``
revokes a joined hive's credentials: its next heartbeat is refused and the
queen stops scheduling onto it.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import click

from rbee.config import HIVE_PORT, is_loopback
from rbee.keeper.errors import BadSetting, KeeperError
from rbee.keeper.lifecycle import KEEP_ALIVE
from rbee.keeper.options import CONTEXT, output_options, pass_session, print_json
from rbee.keeper.session import Session

__all__ = ["INVITE_PREFIX", "encode_invite", "decode_invite", "hive_invite", "hive_join", "hive_remove"]

INVITE_PREFIX = "rbee-invite:"
_DEFAULT_TTL_S = 15 * 60.0


def encode_invite(queen_url: str, code: str, fingerprint: str | None = None) -> str:
    """One string to paste on the other machine: the queen's URL, the code and the fingerprint."""
    fields = {"u": queen_url, "c": code, **({"f": fingerprint} if fingerprint else {})}
    packed = base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode().rstrip("=")
    return INVITE_PREFIX + packed


def decode_invite(invite: str) -> tuple[str, str, str | None]:
    """``(queen URL, code, fingerprint or None)`` from :func:`encode_invite`'s string."""
    text = invite.strip()
    if not text.startswith(INVITE_PREFIX):
        raise BadSetting(f"an invite starts with {INVITE_PREFIX!r} (or give the queen's URL and --invite CODE)")
    packed = text[len(INVITE_PREFIX) :]
    try:
        fields = json.loads(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)))
    except ValueError:
        raise BadSetting("the invite is damaged: copy all of what `rbee hive invite` printed") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("u"), str) or not isinstance(fields.get("c"), str):
        raise BadSetting("the invite is damaged: copy all of what `rbee hive invite` printed")
    fingerprint = fields.get("f")
    return fields["u"], fields["c"], fingerprint if isinstance(fingerprint, str) else None


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadSetting(f"the queen URL {url!r} is not an http(s) URL")
    return url.rstrip("/")


@click.command("invite", context_settings=CONTEXT, short_help="Print a one-time invite for a hive on another machine.")
@click.option(
    "--ttl",
    "ttl_s",
    type=KEEP_ALIVE,
    default=_DEFAULT_TTL_S,
    metavar="DURATION",
    help="How long the invite is valid (5m, 1h). Default: 15m.",
)
@click.option(
    "--url",
    "advertised",
    metavar="URL",
    help="The queen's address as the other machine reaches it. Default: the keeper's queen URL.",
)
@output_options
@pass_session
def hive_invite(session: Session, ttl_s: float, advertised: str | None) -> None:
    """Print an invite with which a hive on another machine joins this queen
    (`rbee hive join INVITE` there). It is valid once, for --ttl, and gives that
    hive credentials of its own, which `rbee hive remove NAME` revokes.

    Run it where the admin token is (the queen's machine).

    \b
    Examples:
      rbee hive invite
      rbee hive invite --url http://192.168.1.20:7833 --ttl 1h
    """
    if ttl_s <= 0:
        raise BadSetting("--ttl must be a positive duration")
    url = _check_url(advertised or session.url)
    client = session.client
    response = client.request("POST", "/v1/hives/invites", json_body={"ttl_s": ttl_s})
    if response.status != 201:
        raise client.refused(response.status, response.body)
    answer = response.json()
    fingerprint = client.info().get("tls_fingerprint")
    if not isinstance(fingerprint, str):
        fingerprint = None
    elif url.startswith("http://"):
        url = "https://" + url.removeprefix("http://")  # the queen serves HTTPS only
    invite = encode_invite(url, str(answer["invite"]), fingerprint)
    expires_at = float(answer["expires_at"])
    if session.json_mode:
        shown = {"invite": invite, "code": answer["invite"], "queen_url": url, "expires_at": expires_at}
        print_json({**shown, "tls_fingerprint": fingerprint})
        return
    click.echo(invite)
    until = time.strftime("%H:%M", time.localtime(expires_at))
    session.renderer.notice(f"Valid once, until {until}. On the other machine: rbee hive join INVITE")
    if advertised is None and is_loopback(urlsplit(url).hostname or ""):
        session.renderer.notice(
            f"note: it names {url}, which only this machine reaches; pass --url with an address the other machine"
            " reaches (and start the queen bound to it)"
        )


@click.command("join", context_settings=CONTEXT, short_help="Join this machine's hive to a queen with an invite.")
@click.argument("target", metavar="INVITE|QUEEN_URL")
@click.option("--invite", "code", metavar="CODE", help="The invite's code, when the first argument is the queen's URL.")
@click.option("--hive-id", metavar="NAME", help="This hive's name in the cluster. Default: this machine's host name.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to bind (its workers bind it too).")
@click.option("--port", default=HIVE_PORT, show_default=True, type=click.IntRange(1, 65535), help="Port to bind.")
@click.option(
    "--keep-alive", type=KEEP_ALIVE, default=None, metavar="DURATION", help="As `rbee hive start --keep-alive`."
)
@click.option("--no-start", is_flag=True, help="Only keep the credentials; start the hive later (`rbee hive start`).")
@click.option("--worker-engine", type=click.Choice(["llama", "fake"]), default=None, hidden=True)
@output_options
@pass_session
def hive_join(
    session: Session,
    target: str,
    code: str | None,
    hive_id: str | None,
    host: str,
    port: int,
    keep_alive: float | None,
    no_start: bool,
    worker_engine: str | None,
) -> None:
    """Join a hive on this machine to the queen that printed the invite, and start it.

    The invite is spent for this hive's own credentials, kept in
    $RBEE_HOME/hives/NAME/credentials.json (mode 0600); `rbee hive start
    --hive-id NAME` and `rbee hive install --hive-id NAME` use them later.

    \b
    Examples:
      rbee hive join rbee-invite:eyJ1Ijoi...
      rbee hive join http://192.168.1.20:7833 --invite Qx3k...  --hive-id gpu-box
    """
    from rbee.keeper.client import QueenClient
    from rbee.keeper.hive_daemon import Credentials, check_hive_id, default_hive_id, save_credentials, start_hive

    # The global --queen-fingerprint pins the queen named on the command line; the invite's pins its own.
    given_pin = os.environ.pop("RBEE_QUEEN_FINGERPRINT", None)
    if code is not None:
        queen_url, fingerprint = _check_url(target), given_pin
    else:
        queen_url, code, fingerprint = decode_invite(target)
        queen_url = _check_url(queen_url)
    name = check_hive_id(hive_id) if hive_id else default_hive_id()
    with QueenClient(queen_url, None, fingerprint=fingerprint) as client:
        response = client.request("POST", "/v1/hives/join", json_body={"invite": code.strip(), "hive_id": name})
        if response.status != 200:
            raise client.refused(response.status, response.body)
        answer = response.json()
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str):
        raise KeeperError(f"{queen_url} did not answer the join as a queen does")
    stored = save_credentials(Credentials(name, queen_url, token, fingerprint))
    result: dict[str, Any] = {"hive_id": name, "queen_url": queen_url, "credentials": str(stored), "started": False}
    if not no_start:
        extra = [f"--keep-alive={keep_alive:g}"] if keep_alive is not None else []
        started = start_hive(
            hive_id=name, queen_url=queen_url, host=host, port=port, worker_engine=worker_engine, extra_args=extra
        )
        result |= {"started": True, "url": started.url, "pid": started.pid, "heartbeats_ok": started.heartbeats_ok}
    if session.json_mode:
        print_json(result)
        return
    click.echo(f"Joined the queen at {queen_url} as hive {name} (credentials: {stored})")
    if no_start:
        click.echo(f"Start it with: rbee hive start --hive-id {name}")
    else:
        click.echo(f"rbee-hive {name} is running at {result['url']} (pid {result['pid']})")
        if result["heartbeats_ok"] is False:
            session.renderer.notice("warning: its heartbeats do not reach the queen yet (see its log)")


@click.command("remove", context_settings=CONTEXT, short_help="Revoke a joined hive's credentials.")
@click.argument("name")
@output_options
@pass_session
def hive_remove(session: Session, name: str) -> None:
    """Revoke the credentials hive NAME got with its invite: the queen refuses its
    next heartbeat (401) and no longer schedules onto it. Run it where the admin
    token is; the hive joins again only with a new invite.

    \b
    Example:
      rbee hive remove gpu-box
    """
    from rbee.keeper.hive_daemon import check_hive_id

    client = session.client
    response = client.request("DELETE", f"/v1/hives/{check_hive_id(name)}/credentials")
    if response.status != 200:
        raise client.refused(response.status, response.body)
    if session.json_mode:
        print_json(response.json())
        return
    click.echo(f"Removed hive {name}: its credentials are revoked and the queen no longer schedules onto it")
