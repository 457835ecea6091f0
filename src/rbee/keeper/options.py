"""What every ``rbee`` command shares: the context settings, the session, ``--json``, ``-q``, ``-v``,
``--queen-url``, ``--token``, ``--queen-fingerprint`` and ``--ca-cert`` after the command as before it,
``--hive``, text flags' escapes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from rbee.keeper.session import Session

__all__ = [
    "CONTEXT",
    "DEFAULT_MODEL",
    "Group",
    "pass_session",
    "output_options",
    "hive_option",
    "print_json",
    "default_model",
    "unescape",
    "GLOBAL_OPTIONS",
    "tls_flag",
]

#: The model ``rbee infer`` asks for unless told (or configured) otherwise.
DEFAULT_MODEL = "gemma3-270m"
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

pass_session = click.make_pass_decorator(Session)


def _set_url(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Session).set_flags(queen_url=value)


def _set_token(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(Session).set_flags(token=value)


def tls_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--queen-fingerprint`` / ``--ca-cert``: through the environment, as ``RBEE_QUEEN_FINGERPRINT`` /
    ``RBEE_CA_CERT``, so every client of the queen this run makes verifies it alike."""
    if value:
        os.environ["RBEE_QUEEN_FINGERPRINT" if param.name == "queen_fingerprint" else "RBEE_CA_CERT"] = value


def _tls_options() -> list[click.Option]:
    return [
        click.Option(
            ["--queen-fingerprint", "queen_fingerprint"],
            metavar="SHA256:...",
            expose_value=False,
            callback=tls_flag,
            help="Trust only the https queen whose certificate has this fingerprint (`rbee queen status` on its"
            " machine shows it). Default: $RBEE_QUEEN_FINGERPRINT.",
        ),
        click.Option(
            ["--ca-cert", "ca_cert"],
            metavar="PEM",
            expose_value=False,
            callback=tls_flag,
            help="Verify an https queen against this certificate file instead of the system's store."
            " Default: $RBEE_CA_CERT.",
        ),
    ]


def _global_options() -> list[click.Option]:
    return [
        click.Option(
            ["--queen-url", "queen_url_flag"],
            metavar="URL",
            expose_value=False,
            callback=_set_url,
            help="The queen to talk to (as before the command).",
        ),
        click.Option(
            ["--token", "token_flag"],
            metavar="TOKEN",
            expose_value=False,
            callback=_set_token,
            help="Bearer token for a queen that requires one (as before the command).",
        ),
        *_tls_options(),
    ]


#: The global options every command that talks to the queen takes after its name as well.
GLOBAL_OPTIONS = ("--queen-url", "--token", "--queen-fingerprint", "--ca-cert")


class Group(click.Group):
    """Commands listed in the order they are defined (most used first), not alphabetically.

    A command with the output options (``--json``...) also gets ``--queen-url``
    and ``--token`` when it has no option of that name itself, so
    ``rbee hive start --host 0.0.0.0 --token ...`` works as ``rbee --token ... hive start`` does.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not isinstance(cmd, click.Group) and any(p.name == "json_flag" for p in cmd.params):
            taken = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
            for option in _global_options():
                if not taken.intersection(option.opts):
                    cmd.params.append(option)
        super().add_command(cmd, name)


F = TypeVar("F", bound=Callable[..., Any])


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Session).json_mode = True


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Session).quiet = True


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Session).verbose = True


def output_options(f: F) -> F:
    """``--json``, ``-q`` and ``-v`` after the command too (``rbee infer ... --json``), as before it."""
    f = click.option(
        "--json",
        "json_flag",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Print every event as one JSON line on stdout, for scripts.",
    )(f)
    f = click.option(
        "-q",
        "--quiet",
        "quiet_flag",
        is_flag=True,
        expose_value=False,
        callback=_set_quiet,
        help="Hide progress and the summary; show only the output.",
    )(f)
    f = click.option(
        "-v",
        "--verbose",
        "verbose_flag",
        is_flag=True,
        expose_value=False,
        callback=_set_verbose,
        help="Show the servers' narration of every step on stderr.",
    )(f)
    return f


hive_option = click.option(
    "--hive", "hive_id", default="localhost", show_default=True, metavar="HIVE_ID", help="The hive to ask."
)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False))


def default_model(session: Session) -> str:
    return session.config.default_model or DEFAULT_MODEL


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in a flag's text as a newline, a tab and a backslash.

    A shell passes ``--stop "\\n\\n"`` as a backslash and an n, twice; any other
    backslash stays as it is (``C:\\models`` keeps its backslash).
    """
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPES:
            out.append(_ESCAPES[text[i + 1]])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)
