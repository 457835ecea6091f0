"""What every ``rbee`` command shares: the context settings, the session, ``--json``, ``--hive``."""

from __future__ import annotations

import json
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
]

#: The model ``rbee infer`` asks for unless told (or configured) otherwise.
DEFAULT_MODEL = "gemma3-270m"
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

pass_session = click.make_pass_decorator(Session)


class Group(click.Group):
    """Commands listed in the order they are defined (most used first), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


F = TypeVar("F", bound=Callable[..., Any])


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Session).json_mode = True


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(Session).quiet = True


def output_options(f: F) -> F:
    """``--json`` and ``-q`` after the command too (``rbee infer ... --json``), as before it."""
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
        help="Hide narration, progress and the summary.",
    )(f)
    return f


hive_option = click.option(
    "--hive", "hive_id", default="localhost", show_default=True, metavar="HIVE_ID", help="The hive to ask."
)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False))


def default_model(session: Session) -> str:
    return session.config.default_model or DEFAULT_MODEL
