"""``rbee hive``, ``rbee worker``, ``rbee model`` and ``rbee queen``: the cluster's machines and what runs on them.

The ``list``, ``spawn``, ``download``... commands are jobs on the queen (which
forwards them to the hive named by ``--hive``); ``queen start|stop|status``
and ``hive start|stop|status`` manage daemons on this machine.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import click

from rbee.config import HIVE_PORT
from rbee.keeper.errors import KeeperError, QueenUnreachable
from rbee.keeper.lifecycle import KEEP_ALIVE
from rbee.keeper.options import CONTEXT, Group, default_model, hive_option, output_options, pass_session, print_json
from rbee.keeper.session import Session
from rbee.units import parse_size

__all__ = ["hive", "worker", "model", "queen"]

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


# -- hives -----------------------------------------------------------------------


def _check_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A size as rbee-hive takes it (``8GiB``, ``512MiB``, bytes), checked here so a bad one is one line."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group(cls=Group, context_settings=CONTEXT, short_help="Hives, one per machine: list, start, stop.")
def hive() -> None:
    """Hives: one per machine, running its workers and keeping its models.

    \b
    Examples:
      rbee hive list                                     # every hive the queen knows
      rbee hive start --host 127.0.0.2 --hive-id beta    # another hive on this machine
      rbee hive status --hive-id beta
      rbee hive stop --hive-id beta

    On another machine, run `rbee hive join INVITE` with what `rbee hive invite` printed on
    the queen's (the hive gets credentials of its own; `rbee hive remove NAME` revokes them),
    or `rbee hive start --host 0.0.0.0 --queen-url http://QUEEN:7833` with RBEE_TOKEN set (a
    hive reachable from the network requires a token). `rbee hive install` runs it as a
    systemd service.
    """


@hive.command("list", context_settings=CONTEXT, short_help="List the hives the queen knows.")
@output_options
@pass_session
def hive_list(session: Session) -> None:
    """List the hives that send heartbeats to the queen: state, address, devices, workers, models.

    \b
    Examples:
      rbee hive list
      rbee hive list --json
    """
    session.run({"operation": "hive_list"})


@hive.command("check", context_settings=CONTEXT, short_help="Run a hive's self-check.")
@click.argument("hive_id", default="localhost")
@output_options
@pass_session
def hive_check(session: Session, hive_id: str) -> None:
    """Run a hive's self-check through the queen (HIVE_ID defaults to localhost).

    \b
    Example:
      rbee hive check beta
    """
    session.run({"operation": "hive_check", "hive_id": hive_id})


@hive.command("start", context_settings=CONTEXT, short_help="Start a hive here and join the queen.")
@click.option("--hive-id", metavar="NAME", help="This hive's name in the cluster. Default: this machine's host name.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (its workers bind it too).")
@click.option("--port", default=HIVE_PORT, show_default=True, type=click.IntRange(1, 65535), help="Port to bind.")
@click.option(
    "--queen-url", "hive_queen_url", metavar="URL", help="The queen to join. Default: the keeper's queen URL."
)
@click.option(
    "--allow-download-from",
    "allow_download_from",
    multiple=True,
    metavar="CIDR|HOST",
    help="Let its downloads reach these addresses or hosts too (loopback and this machine are refused by default).",
)
@click.option(
    "--model-dir",
    "model_dirs",
    multiple=True,
    metavar="DIR",
    help="A directory it may read local model files from, besides $RBEE_HOME/models (repeatable).",
)
@click.option(
    "--keep-alive",
    type=KEEP_ALIVE,
    default=None,
    metavar="DURATION",
    help="How long its workers stay loaded once idle, unless the job says (5m, 30s, 1h; -1: for ever;"
    " 0: stop after the job). Default: 5m.",
)
@click.option(
    "--memory-limit",
    default=None,
    callback=_check_size,
    metavar="SIZE",
    help="A cap on the memory its workers hold in all, e.g. 8GiB (default: the machine's).",
)
@click.option(
    "--tls",
    "tls_mode",
    type=click.Choice(["off", "auto"]),
    default="off",
    show_default=True,
    help="auto: serve HTTPS with a certificate made once in the data directory (its workers use it too).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Serve HTTPS with this certificate (PEM; with --tls-key).",
)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="The key of --tls-cert.")
@click.option(
    "--queen-fingerprint",
    default=None,
    metavar="SHA256:...",
    help="The queen's certificate fingerprint (printed by the queen); the hive talks only to that queen.",
)
@click.option("--worker-engine", type=click.Choice(["llama", "fake"]), default=None, hidden=True)
@output_options
@pass_session
def hive_start(
    session: Session,
    hive_id: str | None,
    host: str,
    port: int,
    hive_queen_url: str | None,
    allow_download_from: tuple[str, ...],
    model_dirs: tuple[str, ...],
    keep_alive: float | None,
    memory_limit: int | None,
    tls_mode: str,
    tls_cert: str | None,
    tls_key: str | None,
    queen_fingerprint: str | None,
    worker_engine: str | None,
) -> None:
    """Start a hive on this machine, in the background, and join it to the queen.

    Its output goes to $RBEE_HOME/logs/hive-NAME.log and its pid to
    $RBEE_HOME/hives/NAME/hive.pid. A hive bound to an address other than
    loopback requires a token (--token or RBEE_TOKEN, the queen's token).

    --keep-alive and --memory-limit are rbee-hive's: the keep-alive of a worker
    whose job gives none, and the most its workers may hold together (a worker
    that would go past it is not started).

    \b
    Examples:
      rbee hive start --host 127.0.0.2 --hive-id beta
      rbee hive start --hive-id beta --keep-alive 30m --memory-limit 12GiB
      RBEE_TOKEN=... rbee hive start --host 0.0.0.0 --queen-url http://queen-host:7833 --hive-id gpu-box
      RBEE_TOKEN=... rbee hive start --host 0.0.0.0 --tls auto --queen-url https://queen-host:7833 \\
          --queen-fingerprint SHA256:... --hive-id gpu-box
    """
    from rbee.keeper.hive_daemon import check_hive_id, default_hive_id, start_hive

    name = check_hive_id(hive_id) if hive_id else default_hive_id()
    queen_url = (hive_queen_url or session.url).rstrip("/")
    extra = [*(f"--allow-download-from={a}" for a in allow_download_from)]
    extra += [f"--model-dir={os.path.abspath(os.path.expanduser(d))}" for d in model_dirs]
    if keep_alive is not None:
        extra.append(f"--keep-alive={keep_alive:g}")
    if memory_limit is not None:
        extra.append(f"--memory-limit={memory_limit}")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if queen_fingerprint is not None:
        extra.append(f"--queen-fingerprint={queen_fingerprint}")
    started = start_hive(
        hive_id=name,
        queen_url=queen_url,
        host=host,
        port=port,
        token=session.token,
        worker_engine=worker_engine,
        extra_args=extra,
        tls=tls_mode,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    if session.json_mode:
        print_json(
            {
                "hive_id": started.hive_id,
                "url": started.url,
                "pid": started.pid,
                "log": str(started.log),
                "queen_url": started.queen_url,
                "started": not started.already_running,
                "heartbeats_ok": started.heartbeats_ok,
            }
        )
        return
    if started.already_running:
        click.echo(f"rbee-hive {started.hive_id} is already running at {started.url} (pid {started.pid})")
        return
    click.echo(
        f"rbee-hive {started.hive_id} is running at {started.url} (pid {started.pid}, log: {started.log}), "
        f"joined to the queen at {started.queen_url}"
    )
    if started.heartbeats_ok is False:
        session.renderer.notice(f"warning: {started.heartbeat_problem}: {started.log}")
    elif started.heartbeats_ok:
        session.renderer.notice(f"See it with: rbee hive list; use it with: rbee infer --hive {started.hive_id} ...")


@hive.command("stop", context_settings=CONTEXT, short_help="Stop a hive started here.")
@click.option("--hive-id", metavar="NAME", help="Which hive. Default: the one running here.")
@output_options
@pass_session
def hive_stop(session: Session, hive_id: str | None) -> None:
    """Stop a hive started on this machine with `rbee hive start`, and its workers.

    \b
    Example:
      rbee hive stop --hive-id beta
    """
    from rbee.keeper.hive_daemon import pick_hive_id, stop_hive

    stopped = stop_hive(pick_hive_id(hive_id))
    if session.json_mode:
        print_json({"hive_id": stopped.hive_id, "pid": stopped.pid, "stopped": stopped.was_running})
    elif not stopped.was_running:
        click.echo(f"rbee-hive {stopped.hive_id} is not running on this machine")
    else:
        how = " (it did not stop in time and was killed)" if stopped.killed else ""
        click.echo(f"Stopped rbee-hive {stopped.hive_id} (pid {stopped.pid}){how}")


@hive.command("status", context_settings=CONTEXT, short_help="Show a hive running here.")
@click.option("--hive-id", metavar="NAME", help="Which hive. Default: the one running here.")
@output_options
@pass_session
def hive_status(session: Session, hive_id: str | None) -> None:
    """Show whether a hive runs on this machine: address, pid, queen, heartbeats (exit 1 when not running).

    \b
    Example:
      rbee hive status --hive-id beta
    """
    from rbee.keeper.hive_daemon import LOCAL_HIVE_ID, hive_info, pick_hive_id
    from rbee.keeper.service import describe, hive_unit_name, service_info

    name = pick_hive_id(hive_id)
    info = hive_info(name, token=session.token)
    where = "running"
    if info is None and name == LOCAL_HIVE_ID:
        info = _hive_in_queen(session, name)
        where = "running inside queen-rbee"
    unit = service_info(hive_unit_name(name), token=session.token)
    if info is None and unit is not None and unit.get("info"):
        info, where = unit["info"], "running as a service"
    if info is None:
        if unit is not None:
            raise KeeperError(f"rbee-hive {name} is not running on this machine; its service {describe(unit)}")
        raise KeeperError(f"rbee-hive {name} is not running on this machine (start it with `rbee hive start`)")
    if unit is not None:
        info = {**info, "service": describe(unit)}
    if session.json_mode:
        print_json(info)
        return
    from rbee.keeper.tables import print_mapping

    click.echo(f"rbee-hive {name} is {where} at {info.get('url')}")
    shown = {k: v for k, v in info.items() if k not in ("component", "hive_id")}
    beats = info.get("heartbeats")
    if isinstance(beats, dict):
        state = "failing: see the log" if beats.get("failing") else "reaching the queen"
        shown["heartbeats"] = f"{beats.get('sent', 0)} sent, every {beats.get('interval_s', 0):g} s, {state}"
    print_mapping(None, shown, out=sys.stdout, colour=session.renderer.colour_out)


def _hive_in_queen(session: Session, name: str) -> dict[str, Any] | None:
    """The queen's own hive (``queen-rbee --local-hive``) as the queen on this machine reports it, if it runs."""
    if not session.local:
        return None
    try:
        info = session.client.info()
        if not info.get("local_hive"):
            return None
        job_id = session.client.submit({"operation": "hive_list"})
        hives: Any = []
        for event in session.client.events(job_id, cancel_on_disconnect=True):
            if event.kind == "result" and isinstance(event.data, dict):
                hives = event.data.get("hives") or []
    except KeeperError:
        return None
    for found in hives if isinstance(hives, list) else []:
        if isinstance(found, dict) and found.get("hive_id") == name:
            return {"queen": session.url, "queen_pid": info.get("pid"), **found}
    return None


# -- workers ---------------------------------------------------------------------


@click.group(cls=Group, context_settings=CONTEXT)
def worker() -> None:
    """Workers: one process, one loaded model, on a hive.

    \b
    Examples:
      rbee worker list --hive beta
      rbee worker spawn -m gemma3-270m --hive beta
      rbee worker stop worker-1a2b3c4d --hive beta
    """


@worker.command("spawn", context_settings=CONTEXT, short_help="Start a worker for a model.")
@click.option("-m", "--model", help="Model id or alias. Default: default_model in the config, else gemma3-270m.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@hive_option
@output_options
@pass_session
def worker_spawn(session: Session, model: str | None, device: str, hive_id: str) -> None:
    """Start a worker for a model on a hive (rbee infer also starts one when none serves the model).

    \b
    Examples:
      rbee worker spawn -m gemma3-270m
      rbee worker spawn -m gemma3-270m --device cuda:0 --hive gpu-box
    """
    op = {"operation": "worker_spawn", "hive_id": hive_id, "model": model or default_model(session), "device": device}
    session.run(op)


@worker.command("list", context_settings=CONTEXT)
@hive_option
@output_options
@pass_session
def worker_list(session: Session, hive_id: str) -> None:
    """List a hive's workers.

    \b
    Example:
      rbee worker list --hive beta
    """
    session.run({"operation": "worker_list", "hive_id": hive_id})


@worker.command("get", context_settings=CONTEXT)
@click.argument("worker_id")
@hive_option
@output_options
@pass_session
def worker_get(session: Session, worker_id: str, hive_id: str) -> None:
    """Show one worker.

    \b
    Example:
      rbee worker get worker-1a2b3c4d --hive beta
    """
    session.run({"operation": "worker_get", "hive_id": hive_id, "worker_id": worker_id})


@worker.command("stop", context_settings=CONTEXT)
@click.argument("worker_id", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop every worker (on --hive, else on every hive).")
@click.option("--hive", "hive_id", metavar="HIVE_ID", help="The hive to ask (default localhost; --all: every hive).")
@output_options
@pass_session
def worker_stop(session: Session, worker_id: str | None, stop_all: bool, hive_id: str | None) -> None:
    """Stop one worker, or with --all every worker (of every model).

    \b
    Examples:
      rbee worker stop worker-1a2b3c4d --hive beta
      rbee worker stop --all --hive beta
      rbee worker stop --all
    """
    if stop_all:
        if worker_id is not None:
            raise click.UsageError("give a WORKER_ID or --all, not both")
        operation: dict[str, str] = {"operation": "worker_stop_all"}
        if hive_id is not None:
            operation["hive_id"] = hive_id
        session.run(operation)
        return
    if worker_id is None:
        raise click.UsageError("give a WORKER_ID, or --all to stop every worker")
    session.run({"operation": "worker_stop", "hive_id": hive_id or "localhost", "worker_id": worker_id})


# -- models ----------------------------------------------------------------------


@click.group(cls=Group, context_settings=CONTEXT)
def model() -> None:
    """The model files (GGUF) each hive has: list, download, delete.

    \b
    Examples:
      rbee model list --hive beta
      rbee model download hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf --alias qwen
      rbee model delete qwen
    """


@model.command("list", context_settings=CONTEXT)
@hive_option
@output_options
@pass_session
def model_list(session: Session, hive_id: str) -> None:
    """List a hive's models.

    \b
    Example:
      rbee model list --hive beta
    """
    session.run({"operation": "model_list", "hive_id": hive_id})


@model.command("get", context_settings=CONTEXT, short_help="Show one model.")
@click.argument("model_id", metavar="MODEL")
@hive_option
@output_options
@pass_session
def model_get(session: Session, model_id: str, hive_id: str) -> None:
    """Show one model: file, size, architecture, quantization, context length, checksum.

    \b
    Example:
      rbee model get gemma3-270m
    """
    session.run({"operation": "model_get", "hive_id": hive_id, "model": model_id})


def _check_sha256(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _SHA256.match(value):
        raise click.BadParameter("must be 64 hexadecimal characters (the file's SHA-256)")
    return value


def _source(ctx: click.Context, param: click.Parameter, text: str) -> str:
    """A path to a file on this machine, made absolute (the hive does not know this shell's directory)."""
    if re.match(r"^(hf:|[A-Za-z][A-Za-z0-9+.-]+://|file:)", text):
        return text
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)  # perhaps on the hive's machine rather than this one
    if not path.exists():
        raise click.BadParameter(
            f"no file {text!r} here; give an http(s) URL, hf:ORG/REPO/FILE.gguf, "
            "or a path (absolute for a file on the hive's machine)"
        )
    return str(path.resolve())


@model.command("download", context_settings=CONTEXT, short_help="Download a GGUF model to a hive.")
@click.argument("source", callback=_source)
@click.option("--alias", metavar="NAME", help="A short name to use the model by (rbee infer -m NAME).")
@click.option("--sha256", metavar="HEX", callback=_check_sha256, help="Refuse the file unless it has this SHA-256.")
@hive_option
@output_options
@pass_session
def model_download(session: Session, source: str, alias: str | None, sha256: str | None, hive_id: str) -> None:
    """Download a GGUF model file to a hive, with a progress bar.

    SOURCE is an http(s) URL, a Hugging Face file (hf:ORG/REPO/FILE.gguf, or
    hf:ORG/REPO@REVISION/FILE.gguf), or a path to a file on the hive's machine.
    The model's id is the file's name without .gguf. A broken connection is
    resumed; the file is checked (GGUF header, and SHA-256 when known) before
    it joins the catalog, and a failed download leaves nothing behind.
    Ctrl-C cancels it.

    \b
    Examples:
      rbee model download https://example.org/models/tiny.gguf --alias tiny --hive beta
      rbee model download hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf --alias qwen
      rbee model download ~/models/my-model.gguf --sha256 9f86d0...
    """
    op = {
        "operation": "model_download",
        "hive_id": hive_id,
        "source": source,
        "alias": alias,
        "sha256": sha256,
    }
    session.run({k: v for k, v in op.items() if v is not None})


@model.command("delete", context_settings=CONTEXT, short_help="Delete a model from a hive.")
@click.argument("model_id", metavar="MODEL")
@hive_option
@output_options
@pass_session
def model_delete(session: Session, model_id: str, hive_id: str) -> None:
    """Delete a downloaded model from a hive (refused while a worker uses it).

    The bundled model is part of rbee and stays.

    \b
    Example:
      rbee model delete tiny --hive beta
    """
    session.run({"operation": "model_delete", "hive_id": hive_id, "model": model_id})


# -- the queen process -----------------------------------------------------------


@click.group(cls=Group, context_settings=CONTEXT)
def queen() -> None:
    """Start, stop and look at the queen on this machine.

    \b
    Examples:
      rbee queen start
      rbee queen status
      rbee queen stop
    """


@queen.command("start", context_settings=CONTEXT, short_help="Start the queen here.")
@click.option(
    "--local-hive/--no-local-hive", default=True, show_default=True, help="Run this machine's hive inside it."
)
@output_options
@pass_session
def queen_start(session: Session, local_hive: bool) -> None:
    """Start queen-rbee in the background at the queen URL's host and port.

    Its output goes to $RBEE_HOME/logs/queen.log and its pid to $RBEE_HOME/queen.pid.

    \b
    Examples:
      rbee queen start
      rbee --queen-url http://127.0.0.1:9000 queen start --no-local-hive
    """
    from rbee.keeper.daemon import start_queen

    started = start_queen(session.url, token=session.token, local_hive=local_hive)
    if session.json_mode:
        print_json(
            {"url": started.url, "pid": started.pid, "log": str(started.log), "started": not started.already_running}
        )
    elif started.already_running:
        click.echo(f"queen-rbee is already running at {started.url}")
    else:
        click.echo(f"queen-rbee is running at {started.url} (pid {started.pid}, log: {started.log})")


@queen.command("stop", context_settings=CONTEXT, short_help="Stop the queen here.")
@output_options
@pass_session
def queen_stop(session: Session) -> None:
    """Stop the queen on this machine (SIGTERM, then SIGKILL after 10 s), with its local hive.

    \b
    Example:
      rbee queen stop
    """
    from rbee.keeper.daemon import stop_queen

    stopped = stop_queen(session.url, token=session.token)
    if session.json_mode:
        print_json({"pid": stopped.pid, "stopped": stopped.was_running, "killed": stopped.killed})
    elif not stopped.was_running:
        click.echo(f"queen-rbee is not running at {session.url}")
    else:
        how = " (it did not stop in time and was killed)" if stopped.killed else ""
        click.echo(f"Stopped queen-rbee (pid {stopped.pid}){how}")


@queen.command("status", context_settings=CONTEXT, short_help="Show whether the queen runs.")
@output_options
@pass_session
def queen_status(session: Session) -> None:
    """Show whether the queen runs, and its version, pid and address (exit 1 when not running).

    \b
    Example:
      rbee queen status
    """
    from rbee.keeper.service import QUEEN_UNIT, describe, unit_state

    unit = unit_state(QUEEN_UNIT) if session.local else None
    try:
        info = session.client.info()
    except QueenUnreachable as exc:
        hint = "start it with `rbee queen start`" if session.local else "check --queen-url"
        if unit is not None:
            hint = f"its service {describe(unit)}"
        raise KeeperError(f"queen-rbee is not running at {session.url}: {exc.reason} ({hint})") from None
    if unit is not None:
        info = {**info, "service": describe(unit)}
    if session.json_mode:
        print_json(info)
        return
    from rbee.keeper.tables import print_mapping

    click.echo(f"queen-rbee is running at {session.url}")
    print_mapping(None, info, out=sys.stdout, colour=session.renderer.colour_out)
