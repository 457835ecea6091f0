"""``llm-worker-rbee``: one process, one model, the job API for ``infer``.

A hive starts it with ``--fd`` (a listening socket the hive bound, so no port
race) and polls ``/v1/ready``; a person may start it with ``--port``. If the
model cannot load, the process exits 1.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import click

from rbee.contracts.operations import check_model_ref
from rbee.daemon import tls_options

__all__ = ["main"]


def _model_ref(ctx: click.Context, param: click.Parameter, value: str | tuple[str, ...] | None) -> object:
    values = value if isinstance(value, tuple) else (value,) if value is not None else ()
    for v in values:
        try:
            check_model_ref(v)
        except ValueError as exc:
            raise click.BadParameter(f"{v!r} {exc}") from None
    return value


def _device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from rbee.worker.engine import parse_device

    try:
        parse_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _listen(host: str, port: int, fd: int | None) -> socket.socket:
    """The listening socket: inherited (``--fd``) or bound here, so the real port is known."""
    if fd is not None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            print(f"llm-worker-rbee: --fd {fd} is not a usable socket: {exc.strerror or exc}", file=sys.stderr)
            raise SystemExit(1) from None
        sock.setblocking(False)
        return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host.strip("[]"), port), family=family, backlog=2048)
    except OSError as exc:
        print(f"llm-worker-rbee: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
    sock.setblocking(False)
    return sock


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="GGUF model file (required unless --engine fake).",
)
@click.option("--worker-id", default=None, help="Worker id (default: worker-<8 hex>).")
@click.option("--model-id", default=None, callback=_model_ref, help="Model name to report (default: the file stem).")
@click.option("--alias", "aliases", multiple=True, callback=_model_ref, help="Another name for the model (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", "-p", default=0, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any).")
@click.option("--fd", type=click.IntRange(0), default=None, help="Serve on this inherited listening socket.")
@click.option("--token", envvar="RBEE_TOKEN", default=None, help="Bearer token required by every endpoint but /health.")
@click.option("--device", default="cpu", show_default=True, callback=_device, help="cpu or cuda:N.")
@click.option(
    "--n-ctx", default=4096, show_default=True, type=click.IntRange(16), help="Context of each slot, in tokens."
)
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores).")
@click.option(
    "--slots",
    default=4,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Sequences generated at once (one batch; each slot has its own --n-ctx context).",
)
@click.option(
    "--batch",
    "chunk",
    default=512,
    show_default=True,
    type=click.IntRange(16, 8192),
    help="Tokens per decode step: one per generating slot, the rest for starting prompts.",
)
@click.option(
    "--batch-invariant/--no-batch-invariant",
    default=True,
    show_default=True,
    help="Greedy output independent of the other sequences in a step (prompt evaluation ~20% slower on CPUs).",
)
@click.option(
    "--repack",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Repack weights into llama.cpp's faster CPU layouts (auto: off on Intel AMX CPUs).",
)
@click.option(
    "--queue",
    "queue_size",
    default=16,
    show_default=True,
    type=click.IntRange(0),
    help="Jobs that may wait for a slot; more are refused with 429.",
)
@click.option(
    "--keep-alive",
    "keep_alive_s",
    default=300.0,
    show_default=True,
    type=click.FloatRange(-1),
    metavar="SECONDS",
    help="How long to stay loaded once idle when the last job did not say (-1: for ever; 0: stop after it).",
)
@click.option(
    "--override-kv",
    "kv_overrides",
    multiple=True,
    metavar="KEY=TYPE:VALUE",
    help="Replace a GGUF metadata value at load, as llama.cpp's --override-kv (TYPE: int, float, bool, str).",
)
@click.option(
    "--fake-fim",
    is_flag=True,
    help="fake: the fake model has fill-in-the-middle tokens.",
)
@click.option(
    "--engine",
    "engine_kind",
    type=click.Choice(["llama", "fake"]),
    default="llama",
    show_default=True,
    help="fake: a scripted engine for tests and overhead benchmarks.",
)
@click.option(
    "--fake-tokens",
    envvar="RBEE_FAKE_TOKENS",
    default=16,
    show_default=True,
    type=click.IntRange(0),
    help="fake: pieces per job.",
)
@click.option(
    "--fake-delay-ms",
    envvar="RBEE_FAKE_DELAY_MS",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="fake: ms per piece.",
)
@click.option(
    "--fake-fail-after",
    envvar="RBEE_FAKE_FAIL_AFTER",
    default=None,
    type=click.IntRange(0),
    help="fake: fail after this many pieces.",
)
@tls_options
def main(
    model_path: Path | None,
    worker_id: str | None,
    model_id: str | None,
    aliases: tuple[str, ...],
    host: str,
    port: int,
    fd: int | None,
    token: str | None,
    device: str,
    n_ctx: int,
    threads: int | None,
    slots: int,
    chunk: int,
    batch_invariant: bool,
    repack: str,
    queue_size: int,
    keep_alive_s: float,
    kv_overrides: tuple[str, ...],
    fake_fim: bool,
    engine_kind: str,
    fake_tokens: int,
    fake_delay_ms: float,
    fake_fail_after: int | None,
    tls_mode: str,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Run a worker: load one model and generate tokens for ``infer`` jobs."""
    if keep_alive_s < 0 and keep_alive_s != -1:
        raise click.BadParameter("must be -1 (for ever), 0 or a number of seconds", param_hint="--keep-alive")
    from rbee.worker.engine import Engine, LlamaEngine, parse_kv_override
    from rbee.worker.fake import FakeEngine

    overrides: dict[str, bool | int | float | str] = {}
    for text in kv_overrides:
        try:
            key, value = parse_kv_override(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--override-kv") from None
        overrides[key] = value
    engine: Engine
    if engine_kind == "fake":
        engine = FakeEngine(
            tokens=fake_tokens,
            delay_ms=fake_delay_ms,
            fail_after=fake_fail_after,
            model_id=model_id or (model_path.stem if model_path else "fake-model"),
            n_ctx=n_ctx,
            slots=slots,
            fim=fake_fim,
        )
    else:
        if model_path is None:
            raise click.UsageError("--model is required (unless --engine fake)")
        engine = LlamaEngine(
            model_path,
            model_id=model_id,
            n_ctx=n_ctx,
            slots=slots,
            chunk=chunk,
            batch_invariant=batch_invariant,
            repack=None if repack == "auto" else repack == "on",
            n_threads=threads or os.cpu_count() or 1,
            device=device,
            kv_overrides=overrides,
        )

    from rbee.daemon import announce, preflight, resolve_tls, serve

    preflight("worker", host, token)
    tls = resolve_tls("worker", tls_mode, tls_cert, tls_key, name=f"worker-{worker_id or 'any'}", host=host)
    from rbee.narration import narrate
    from rbee.worker.app import WorkerSettings, create_worker_app, new_worker_id

    settings = WorkerSettings(
        worker_id=worker_id or new_worker_id(),
        model_id=model_id,
        aliases=list(aliases),
        model_path=model_path,
        device=device,
        token=token,
        slots=slots,
        queue=queue_size,
        keep_alive_s=keep_alive_s,
        exit_on_load_failure=True,
    )
    sock = _listen(host, port, fd)
    bound_host, bound_port = sock.getsockname()[:2]
    scheme = "https" if tls is not None else "http"
    if tls is not None:
        announce("worker", tls)
    narrate(
        "worker_listening",
        f"Worker {settings.worker_id} listening on {scheme}://{bound_host}:{bound_port}",
        worker_id=settings.worker_id,
        port=bound_port,
    )
    serve(create_worker_app(engine, settings), host, bound_port, sock=sock, tls=tls)


if __name__ == "__main__":
    main()
