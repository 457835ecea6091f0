"""``queen-rbee``: the orchestrator daemon."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rbee.config import QUEEN_PORT


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "-p", default=QUEEN_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="RBEE_TOKEN", default=None, help="Bearer token required by every endpoint but /health.")
@click.option("--local-hive/--no-local-hive", default=False, help="Run a hive for this machine inside the queen.")
@click.option("--local-hive-port", default=0, type=click.IntRange(0, 65535), help="Port of the local hive (0: any).")
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--home", type=click.Path(path_type=Path), default=None, help="Data directory (default $RBEE_HOME).")
def main(
    host: str,
    port: int,
    token: str | None,
    local_hive: bool,
    local_hive_port: int,
    queue_size: int,
    home: Path | None,
) -> None:
    """Run the queen: job server, scheduler and telemetry registry of an rbee cluster."""
    from rbee.daemon import preflight, serve

    preflight("queen", host, token)
    if home is not None:
        os.environ["RBEE_HOME"] = str(home)
    from rbee.queen.app import QueenSettings, create_queen_app

    settings = QueenSettings(
        host=host,
        port=port,
        token=token,
        home=home,
        local_hive=local_hive,
        local_hive_port=local_hive_port,
        queue_size=queue_size,
    )
    serve(create_queen_app(settings), host, port)


if __name__ == "__main__":
    main()
