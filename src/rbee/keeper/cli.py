"""``rbee``: the command people use. A thin HTTP client of the queen.

Every command that does something is a job on the queen: the keeper submits
the operation, renders the job's stream (:mod:`rbee.keeper.render`) and exits
with the code its ``end`` event decides (:mod:`rbee.keeper.errors`). When the
queen is not running on this machine, the commands that need it start it.

Start-up time matters (``rbee infer`` shows its first token in well under
200 ms on a warm cluster), so this module imports click, the stdlib-only
:mod:`rbee.config` and the keeper's own client and renderer; tables (rich)
and process control are imported by the commands that use them.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from rbee import __version__
from rbee.keeper.errors import EXIT_FAILED, EXIT_INTERRUPTED, KeeperError, QueenUnreachable, one_line
from rbee.keeper.session import Session

__all__ = ["cli", "main", "DEFAULT_MODEL"]

#: The model ``rbee infer`` asks for unless told (or configured) otherwise.
DEFAULT_MODEL = "gemma3-270m"
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


pass_session = click.make_pass_decorator(Session)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False))


@click.group(context_settings=_CONTEXT)
@click.option(
    "--queen-url",
    metavar="URL",
    help="The queen to talk to. Default: $RBEE_QUEEN_URL, else queen_url in ~/.config/rbee/config.toml, "
    "else http://127.0.0.1:7833.",
)
@click.option("--token", metavar="TOKEN", help="Bearer token for a queen that requires one. Default: $RBEE_TOKEN.")
@click.option("-q", "--quiet", is_flag=True, help="Hide narration, progress and the summary; show only the output.")
@click.option("--json", "json_mode", is_flag=True, help="Print every event as one JSON line on stdout, for scripts.")
@click.version_option(__version__, "-V", "--version", prog_name="rbee")
@click.pass_context
def cli(ctx: click.Context, queen_url: str | None, token: str | None, quiet: bool, json_mode: bool) -> None:
    """Run LLM inference on the machines you already own, with every step narrated.

    \b
    Examples:
      rbee infer "Why is the sky blue?"
      echo "Write a haiku about bees" | rbee infer -m gemma3-270m --max-tokens 64
      rbee status
      rbee --json queen-check
      rbee jobs list

    The queen is started on this machine when a command needs it and it is not
    running (set RBEE_NO_AUTOSTART=1 to prevent that).
    """
    session = Session(queen_url=queen_url, token=token, quiet=quiet, json_mode=json_mode)
    ctx.obj = session
    ctx.call_on_close(session.close)


# -- infer -------------------------------------------------------------------


@cli.command(context_settings=_CONTEXT)
@click.argument("prompt", required=False)
@click.option("-m", "--model", help=f"Model id or alias. Default: default_model in the config, else {DEFAULT_MODEL}.")
@click.option("--max-tokens", type=int, help="Most tokens to generate.")
@click.option("--temperature", type=float, help="Sampling temperature, 0 to 2.")
@click.option("--top-p", type=float, help="Nucleus sampling, 0 to 1.")
@click.option("--top-k", type=int, help="Top-k sampling (0: off).")
@click.option("--seed", type=int, help="Random seed, for repeatable output.")
@click.option("--stop", multiple=True, help="Stop when this text is generated (repeatable, at most 4).")
@click.option("--hive", "hive_id", metavar="HIVE_ID", help="Run on this hive.")
@click.option("--worker", "worker_id", metavar="WORKER_ID", help="Run on this worker.")
@click.option("--device", help="Run on this device: cpu or cuda:N.")
@click.option("--timeout", "timeout_s", type=float, metavar="SECONDS", help="Give up after this many seconds.")
@pass_session
def infer(session: Session, /, prompt: str | None, **options: Any) -> None:
    """Generate text from PROMPT (read from stdin when omitted or "-").

    Tokens go to stdout as they arrive; narration of each step goes to stderr.
    Ctrl-C cancels the job.

    \b
    Examples:
      rbee infer "Why is the sky blue?"
      rbee infer -m gemma3-270m --max-tokens 50 --temperature 0 "Count to ten:"
      cat notes.txt | rbee infer --stop "###" -
      rbee -q infer "Name three bees" > answer.txt
    """
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    operation: dict[str, Any] = {"operation": "infer", "model": options.pop("model") or _default_model(session)}
    sampling = session.config.sampling if session.config.sampling else {}
    operation.update({k: v for k, v in sampling.items() if k in _SAMPLING_KEYS})
    options["stop"] = list(options["stop"]) or None
    operation.update({k: v for k, v in options.items() if v is not None})
    operation["prompt"] = prompt
    session.run(operation, summary=True)


def _default_model(session: Session) -> str:
    return session.config.default_model or DEFAULT_MODEL


# -- cluster -----------------------------------------------------------------


@cli.command(context_settings=_CONTEXT)
@pass_session
def status(session: Session) -> None:
    """Show the hives, workers and queues the queen knows.

    \b
    Examples:
      rbee status
      rbee --json status | jq 'select(.event == "result") | .data.workers'
    """
    session.run({"operation": "status"})


@cli.command("queen-check", context_settings=_CONTEXT)
@pass_session
def queen_check(session: Session) -> None:
    """Run the queen's self-check: narration from every path of a job.

    \b
    Example:
      rbee queen-check
    """
    session.run({"operation": "queen_check"})


@cli.group(context_settings=_CONTEXT)
def hive() -> None:
    """The hives (one per machine) the queen knows."""


@hive.command("list", context_settings=_CONTEXT)
@pass_session
def hive_list(session: Session) -> None:
    """List the hives that send heartbeats to the queen.

    \b
    Example:
      rbee hive list
    """
    session.run({"operation": "hive_list"})


@hive.command("check", context_settings=_CONTEXT)
@click.argument("hive_id", default="localhost")
@pass_session
def hive_check(session: Session, hive_id: str) -> None:
    """Run a hive's self-check through the queen (HIVE_ID defaults to localhost).

    \b
    Example:
      rbee hive check localhost
    """
    session.run({"operation": "hive_check", "hive_id": hive_id})


_hive_option = click.option(
    "--hive", "hive_id", default="localhost", show_default=True, metavar="HIVE_ID", help="The hive to ask."
)


@cli.group(context_settings=_CONTEXT)
def worker() -> None:
    """Workers: one process, one loaded model."""


@worker.command("spawn", context_settings=_CONTEXT)
@click.option("-m", "--model", help=f"Model id or alias. Default: default_model in the config, else {DEFAULT_MODEL}.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@_hive_option
@pass_session
def worker_spawn(session: Session, model: str | None, device: str, hive_id: str) -> None:
    """Start a worker for a model on a hive.

    \b
    Examples:
      rbee worker spawn -m gemma3-270m
      rbee worker spawn -m gemma3-270m --device cuda:0 --hive gpu-box
    """
    op = {"operation": "worker_spawn", "hive_id": hive_id, "model": model or _default_model(session), "device": device}
    session.run(op)


@worker.command("list", context_settings=_CONTEXT)
@_hive_option
@pass_session
def worker_list(session: Session, hive_id: str) -> None:
    """List a hive's workers.

    \b
    Example:
      rbee worker list --hive localhost
    """
    session.run({"operation": "worker_list", "hive_id": hive_id})


@worker.command("get", context_settings=_CONTEXT)
@click.argument("worker_id")
@_hive_option
@pass_session
def worker_get(session: Session, worker_id: str, hive_id: str) -> None:
    """Show one worker.

    \b
    Example:
      rbee worker get worker-1a2b
    """
    session.run({"operation": "worker_get", "hive_id": hive_id, "worker_id": worker_id})


@worker.command("stop", context_settings=_CONTEXT)
@click.argument("worker_id")
@_hive_option
@pass_session
def worker_stop(session: Session, worker_id: str, hive_id: str) -> None:
    """Stop one worker.

    \b
    Example:
      rbee worker stop worker-1a2b
    """
    session.run({"operation": "worker_stop", "hive_id": hive_id, "worker_id": worker_id})


@cli.group(context_settings=_CONTEXT)
def model() -> None:
    """The model files a hive has."""


@model.command("list", context_settings=_CONTEXT)
@_hive_option
@pass_session
def model_list(session: Session, hive_id: str) -> None:
    """List a hive's models.

    \b
    Example:
      rbee model list
    """
    session.run({"operation": "model_list", "hive_id": hive_id})


@model.command("get", context_settings=_CONTEXT)
@click.argument("model_id", metavar="MODEL")
@_hive_option
@pass_session
def model_get(session: Session, model_id: str, hive_id: str) -> None:
    """Show one model.

    \b
    Example:
      rbee model get gemma3-270m
    """
    session.run({"operation": "model_get", "hive_id": hive_id, "model": model_id})


@model.command("download", context_settings=_CONTEXT)
@click.argument("source")
@click.option("--alias", help="A short name to use the model by.")
@click.option("--sha256", help="Expected SHA-256 of the file.")
@_hive_option
@pass_session
def model_download(session: Session, source: str, alias: str | None, sha256: str | None, hive_id: str) -> None:
    """Download a GGUF file (path, http(s) URL or Hugging Face repo file) to a hive.

    \b
    Example:
      rbee model download https://example.org/model.gguf --alias mymodel
    """
    op = {"operation": "model_download", "hive_id": hive_id, "source": source, "alias": alias, "sha256": sha256}
    session.run({k: v for k, v in op.items() if v is not None})


@model.command("delete", context_settings=_CONTEXT)
@click.argument("model_id", metavar="MODEL")
@_hive_option
@pass_session
def model_delete(session: Session, model_id: str, hive_id: str) -> None:
    """Delete a model from a hive.

    \b
    Example:
      rbee model delete mymodel
    """
    session.run({"operation": "model_delete", "hive_id": hive_id, "model": model_id})


# -- the queen process ---------------------------------------------------------


@cli.group(context_settings=_CONTEXT)
def queen() -> None:
    """Start, stop and look at the queen on this machine."""


@queen.command("start", context_settings=_CONTEXT)
@click.option(
    "--local-hive/--no-local-hive", default=True, show_default=True, help="Run this machine's hive inside it."
)
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
        _print_json(
            {"url": started.url, "pid": started.pid, "log": str(started.log), "started": not started.already_running}
        )
    elif started.already_running:
        click.echo(f"queen-rbee is already running at {started.url}")
    else:
        click.echo(f"queen-rbee is running at {started.url} (pid {started.pid}, log: {started.log})")


@queen.command("stop", context_settings=_CONTEXT)
@pass_session
def queen_stop(session: Session) -> None:
    """Stop the queen on this machine (SIGTERM, then SIGKILL after 10 s).

    \b
    Example:
      rbee queen stop
    """
    from rbee.keeper.daemon import stop_queen

    stopped = stop_queen(session.url, token=session.token)
    if session.json_mode:
        _print_json({"pid": stopped.pid, "stopped": stopped.was_running, "killed": stopped.killed})
    elif not stopped.was_running:
        click.echo(f"queen-rbee is not running at {session.url}")
    else:
        how = " (it did not stop in time and was killed)" if stopped.killed else ""
        click.echo(f"Stopped queen-rbee (pid {stopped.pid}){how}")


@queen.command("status", context_settings=_CONTEXT)
@pass_session
def queen_status(session: Session) -> None:
    """Show whether the queen runs, and its version, pid and address (exit 1 when not running).

    \b
    Example:
      rbee queen status
    """
    try:
        info = session.client.info()
    except QueenUnreachable as exc:
        raise KeeperError(f"queen-rbee is not running at {session.url}: {exc.reason}") from None
    if session.json_mode:
        _print_json(info)
        return
    from rbee.keeper.tables import print_mapping

    click.echo(f"queen-rbee is running at {session.url}")
    print_mapping(None, info, out=sys.stdout, colour=session.renderer.colour_out)


# -- jobs --------------------------------------------------------------------


@cli.group(context_settings=_CONTEXT)
def jobs() -> None:
    """The queen's jobs: recent history, details, logs, cancel."""


def _duration(ms: float | None) -> str | None:
    if ms is None:
        return None
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _job_row(job: dict[str, Any]) -> dict[str, Any]:
    duration = job.get("duration_ms")
    if duration is None and job.get("finished_at") and (job.get("started_at") or job.get("created_at")):
        duration = (job["finished_at"] - (job.get("started_at") or job["created_at"])) * 1000
    tokens = job.get("tokens_out")
    if tokens is None:
        tokens = job.get("tokens") or None
    error = job.get("error")
    return {
        **job,
        "duration": _duration(duration),
        "tokens": tokens,
        "error": one_line(f"{error.get('kind')}: {error.get('message')}", 80) if isinstance(error, dict) else None,
    }


@jobs.command("list", context_settings=_CONTEXT)
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="How many jobs.")
@pass_session
def jobs_list(session: Session, limit: int) -> None:
    """List recent jobs, newest first.

    \b
    Example:
      rbee jobs list -n 50
    """
    rows = session.client.jobs(limit)
    if session.json_mode:
        _print_json({"jobs": rows})
        return
    from rbee.keeper.tables import JOB_COLUMNS, print_rows

    print_rows("jobs", [_job_row(j) for j in rows], JOB_COLUMNS, out=sys.stdout, colour=session.renderer.colour_out)


@jobs.command("show", context_settings=_CONTEXT)
@click.argument("job_id")
@pass_session
def jobs_show(session: Session, job_id: str) -> None:
    """Show a job's state, timings and result.

    \b
    Example:
      rbee jobs show job-0b9c...
    """
    job = session.client.job(job_id)
    if session.json_mode:
        _print_json(job)
        return
    from rbee.keeper.tables import print_mapping

    print_mapping(job_id, job, out=sys.stdout, colour=session.renderer.colour_out)


@jobs.command("cancel", context_settings=_CONTEXT)
@click.argument("job_id")
@pass_session
def jobs_cancel(session: Session, job_id: str) -> None:
    """Cancel a job; for a job that already ended, report how it ended.

    \b
    Example:
      rbee jobs cancel job-0b9c...
    """
    code, job = session.client.cancel(job_id)
    if session.json_mode:
        _print_json(job)
        return
    state = job.get("status", "unknown")
    if code == 409:
        click.echo(f"{job_id} had already finished: {state}")
    elif state in ("cancelled", "completed", "failed", "timed_out"):
        click.echo(f"{job_id} is {state}")
    else:
        click.echo(f"{job_id} is being cancelled (now {state})")


@jobs.command("logs", context_settings=_CONTEXT)
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep reading until the job ends.")
@pass_session
def jobs_logs(session: Session, job_id: str, follow: bool) -> None:
    """Replay a job's events (narration, tokens, results); exit as the job ended.

    Without --follow, a job that is still running is shown up to now.

    \b
    Examples:
      rbee jobs logs job-0b9c...
      rbee --json jobs logs --follow job-0b9c...
    """
    until = None
    if not follow:
        job = session.client.job(job_id)
        if job.get("status") in ("queued", "running") and isinstance(job.get("events"), int):
            until = job["events"]
    session.follow(job_id, until=until)


# -- the entry point -----------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run ``rbee``; every outcome becomes an exit code here, never a traceback."""
    try:
        code = cli.main(args=argv, prog_name="rbee", standalone_mode=False)
    except click.exceptions.Abort:
        code = EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``rbee infer ... | head``); say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_FAILED
    except Exception as exc:
        if os.environ.get("RBEE_DEBUG"):
            raise
        click.echo(
            f"rbee: unexpected error: {type(exc).__name__}: {one_line(str(exc))} (RBEE_DEBUG=1 shows more)", err=True
        )
        code = EXIT_FAILED
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
