"""``queen-rbee``: the orchestrator daemon."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rbee.config import QUEEN_PORT
from rbee.daemon import tls_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "-p", default=QUEEN_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--token",
    "tokens",
    envvar="RBEE_TOKEN",
    multiple=True,
    help="Bearer token required by every endpoint but /health (repeatable: the first is the admin token;"
    " each further one sees only its own jobs).",
)
@click.option(
    "--tokens-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="More tokens, one a line ('#' starts a comment), each seeing only its own jobs.",
)
@click.option("--local-hive/--no-local-hive", default=False, help="Run a hive for this machine inside the queen.")
@click.option("--local-hive-port", default=0, type=click.IntRange(0, 65535), help="Port of the local hive (0: any).")
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--home", type=click.Path(path_type=Path), default=None, help="Data directory (default $RBEE_HOME).")
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    help="A web origin (https://chat.example) whose pages may call this queen; '*' for any (repeatable).",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    help="A host name this queen answers for besides its addresses, localhost and this machine's name (repeatable).",
)
@tls_options
def main(
    host: str,
    port: int,
    tokens: tuple[str, ...],
    tokens_file: Path | None,
    local_hive: bool,
    local_hive_port: int,
    queue_size: int,
    home: Path | None,
    allow_origins: tuple[str, ...],
    allow_hosts: tuple[str, ...],
    tls_mode: str,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Run the queen: job server, scheduler and telemetry registry of an rbee cluster."""
    from rbee.config import MIN_TOKEN_CHARS
    from rbee.daemon import announce, preflight, resolve_tls, serve

    every = [t for t in tokens if t]
    if tokens_file is not None:
        if not every:
            raise click.BadParameter("a tokens file needs an admin token first (--token)", param_hint="--tokens-file")
        lines = (line.split("#", 1)[0].strip() for line in tokens_file.read_text().splitlines())
        every += [line for line in lines if line]
    if any(len(t) < MIN_TOKEN_CHARS for t in every[1:]):
        raise click.BadParameter(f"every token must be at least {MIN_TOKEN_CHARS} characters", param_hint="--token")
    token = every[0] if every else None
    preflight("queen", host, token)
    if home is not None:
        os.environ["RBEE_HOME"] = str(home)
    tls = resolve_tls("queen", tls_mode, tls_cert, tls_key, name="queen", host=host)
    # Through the environment, so the local hive and the workers it starts take them too.
    for name, values in (("RBEE_ALLOW_ORIGINS", allow_origins), ("RBEE_ALLOW_HOSTS", allow_hosts)):
        if values:
            os.environ[name] = ",".join([*filter(None, os.environ.get(name, "").split(",")), *values])
    from rbee.queen.app import QueenSettings, create_queen_app

    settings = QueenSettings(
        host=host,
        port=port,
        token=token,
        user_tokens=tuple(dict.fromkeys(every[1:])),
        home=home,
        local_hive=local_hive,
        local_hive_port=local_hive_port,
        queue_size=queue_size,
    )
    app = create_queen_app(settings)
    if tls is not None:
        announce("queen", tls)
        app.state.tls_fingerprint = tls.fingerprint  # for /v1/info: what hives and keepers pin
    serve(app, host, port, tls=tls)


if __name__ == "__main__":
    main()
