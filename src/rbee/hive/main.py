"""``rbee-hive``: one per machine; spawns and stops workers, keeps the model catalog."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click

from rbee.config import HIVE_PORT
from rbee.daemon import tls_options

_HIVE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _check_hive_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not _HIVE_ID.match(value):
        raise click.BadParameter("must be 1-128 characters of letters, digits and . _ : -")
    return value


def _check_fingerprint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return None
    from rbee.wire.tls import parse_fingerprint

    try:
        return parse_fingerprint(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_queen(queen_url: str, pin: str) -> None:
    """SSH's first contact: a queen that answers with another certificate is refused before anything is sent.

    Exit 1 with one line; a queen not running yet is looked at again by every heartbeat.
    """
    import ssl
    from urllib.parse import urlsplit

    from rbee.wire.tls import CertificateMismatch, pinned_context

    parts = urlsplit(queen_url)
    try:
        pinned_context(parts.hostname or "", parts.port or 443, pin, timeout_s=3.0)
    except CertificateMismatch as exc:
        print(f"hive: refusing the queen at {queen_url}: {exc} (--queen-fingerprint)", file=sys.stderr)
        raise SystemExit(1) from None
    except (OSError, ssl.SSLError, TimeoutError):
        return  # not up yet, or not TLS: the heartbeats say so, and retry


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
@click.option(
    "--queen-fingerprint",
    envvar="RBEE_QUEEN_FINGERPRINT",
    default=None,
    callback=_check_fingerprint,
    metavar="SHA256:...",
    help="Trust only the https queen whose certificate has this SHA-256 fingerprint (the queen prints it).",
)
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
@tls_options
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
    queen_fingerprint: str | None,
    tls_mode: str,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Run a hive: the workers and model files of this machine, reporting to a queen.

    \b
    Examples:
      rbee-hive --queen-url http://127.0.0.1:7833 --hive-id beta --host 127.0.0.2
      RBEE_TOKEN=... rbee-hive --host 0.0.0.0 --queen-url http://queen-host:7833 --hive-id gpu-box
      rbee-hive --host 0.0.0.0 --tls auto --queen-url https://queen-host:7833 --queen-fingerprint SHA256:...
    """
    from rbee.daemon import announce, preflight, resolve_tls, serve

    if keep_alive_s < 0 and keep_alive_s != -1:
        raise click.BadParameter("must be -1 (for ever), 0 or a number of seconds", param_hint="--keep-alive")
    if queen_fingerprint and not (queen_url or "").startswith("https://"):
        raise click.BadParameter("a fingerprint pins an https:// --queen-url", param_hint="--queen-fingerprint")
    preflight("hive", host, token)
    if home is not None:
        home = home.expanduser().resolve()
        os.environ["RBEE_HOME"] = str(home)
    tls = resolve_tls("hive", tls_mode, tls_cert, tls_key, name=f"hive-{hive_id}", host=host)
    if tls is not None and token and queen_url and queen_url.startswith("http://"):
        from urllib.parse import urlsplit

        from rbee.config import is_loopback

        if not is_loopback(urlsplit(queen_url).hostname or ""):
            # With TLS on, no token crosses the network in clear: the heartbeats carry it.
            print(
                "hive: refusing to start: --tls is on but --queen-url is http://, which would send the token"
                " in clear; give the queen's https:// URL (and --queen-fingerprint)",
                file=sys.stderr,
            )
            raise SystemExit(2)
    if queen_url and queen_fingerprint:
        _check_queen(queen_url, queen_fingerprint)
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
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
        tls_fingerprint=tls.fingerprint if tls else None,
        queen_fingerprint=queen_fingerprint,
    )
    if tls is not None:
        announce("hive", tls)
    serve(create_hive_app(settings), host, port, sock=sock, tls=tls)


if __name__ == "__main__":
    main()
