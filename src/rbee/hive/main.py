"""``rbee-hive``: one per machine; spawns and stops workers, keeps the model catalog."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from rbee.config import HIVE_PORT

_HIVE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _check_hive_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not _HIVE_ID.match(value):
        raise click.BadParameter("must be 1-128 characters of letters, digits and . _ : -")
    return value


def _check_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    from rbee.units import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (workers bind it too).")
@click.option("--port", "-p", default=HIVE_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--hive-id", default="localhost", show_default=True, callback=_check_hive_id, help="This hive's name.")
@click.option("--queen-url", default=None, help="Send heartbeats to this queen (none: no heartbeats).")
@click.option("--token", envvar="RBEE_TOKEN", default=None, help="Bearer token required by every endpoint but /health.")
@click.option("--home", type=click.Path(path_type=Path), default=None, help="Data directory (default $RBEE_HOME).")
@click.option(
    "--worker-engine",
    type=click.Choice(["llama", "fake"]),
    default="llama",
    show_default=True,
    help="Engine of the workers this hive starts (fake: scripted tokens, for tests).",
)
@click.option(
    "--worker-arg",
    "worker_args",
    multiple=True,
    help="An extra flag passed to every worker (repeatable), e.g. --worker-arg=--fake-tokens=50.",
)
@click.option("--heartbeat-interval", default=2.0, show_default=True, type=click.FloatRange(0.05, 3600.0))
@click.option(
    "--keep-alive",
    "keep_alive_s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(-1, 30 * 86_400.0),
    metavar="SECONDS",
    help="How long a worker stays loaded once idle, unless its job said (-1: for ever; 0: stop after the job).",
)
@click.option(
    "--memory-limit",
    default=None,
    callback=_check_size,
    metavar="BYTES|SIZE",
    help="A cap on the memory this hive's workers hold in all, e.g. 8GiB (default: the machine's).",
)
@click.option(
    "--hf-endpoint",
    envvar="HF_ENDPOINT",
    default=None,
    metavar="URL",
    help="Where hf:ORG/REPO/FILE.gguf sources are fetched (default $HF_ENDPOINT, else https://huggingface.co).",
)
@click.option(
    "--allow-download-from",
    "allow_download_from",
    multiple=True,
    metavar="CIDR|HOST",
    help="Let downloads reach these addresses or hosts too (loopback and this machine are refused by default).",
)
@click.option(
    "--model-dir",
    "model_dirs",
    multiple=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="A directory local model files may be downloaded from, besides $RBEE_HOME/models (repeatable).",
)
def main(
    host: str,
    port: int,
    hive_id: str,
    queen_url: str | None,
    token: str | None,
    home: Path | None,
    worker_engine: str,
    worker_args: tuple[str, ...],
    heartbeat_interval: float,
    keep_alive_s: float,
    memory_limit: int | None,
    hf_endpoint: str | None,
    allow_download_from: tuple[str, ...],
    model_dirs: tuple[Path, ...],
) -> None:
    """Run a hive: the workers and model files of this machine, reporting to a queen.

    \b
    Examples:
      rbee-hive --queen-url http://127.0.0.1:7833 --hive-id beta --host 127.0.0.2
      RBEE_TOKEN=... rbee-hive --host 0.0.0.0 --queen-url http://queen-host:7833 --hive-id gpu-box
    """
    from rbee.daemon import preflight, serve

    if keep_alive_s < 0 and keep_alive_s != -1:
        raise click.BadParameter("must be -1 (for ever), 0 or a number of seconds", param_hint="--keep-alive")
    preflight("hive", host, token)
    if home is not None:
        home = home.expanduser().resolve()
        os.environ["RBEE_HOME"] = str(home)
    from rbee.hive.app import HiveSettings, create_hive_app

    sock = None
    if port == 0:
        # Any free port: bind here so the address in heartbeats is the real one.
        from rbee.hive.addresses import listen_socket

        try:
            sock = listen_socket(host)
        except OSError as exc:
            raise click.ClickException(f"cannot listen on {host}: {exc.strerror or exc}") from None
        port = sock.getsockname()[1]
    settings = HiveSettings(
        host=host,
        port=port,
        hive_id=hive_id,
        queen_url=queen_url.rstrip("/") if queen_url else None,
        token=token,
        home=home,
        worker_engine=worker_engine,
        worker_args=worker_args,
        heartbeat_interval_s=heartbeat_interval,
        keep_alive_s=keep_alive_s,
        memory_limit_bytes=memory_limit,
        hf_endpoint=hf_endpoint,
        allow_download_from=allow_download_from,
        model_dirs=model_dirs,
    )
    serve(create_hive_app(settings), host, port, sock=sock)


if __name__ == "__main__":
    main()
