"""``rbee``: the command people use. A thin HTTP client of the queen.

Every command that does something is a job on the queen: the keeper submits
the operation, renders the job's stream (:mod:`rbee.keeper.render`) and exits
with the code its ``end`` event decides (:mod:`rbee.keeper.errors`). When the
queen is not running on this machine, the commands that need it start it.
The machine commands (``hive``, ``worker``, ``model``, ``queen``) live in
:mod:`rbee.keeper.machines`.

Start-up time matters (``rbee infer`` shows its first token in well under
200 ms on a warm cluster), so this module imports click, the stdlib-only
:mod:`rbee.config` and the keeper's own client and renderer; tables (rich)
and process control are imported by the commands that use them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from rbee import __version__
from rbee.keeper import install, join, lifecycle
from rbee.keeper.chat import chat as chat_command
from rbee.keeper.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, one_line
from rbee.keeper.machines import hive, model, queen, worker
from rbee.keeper.options import (
    CONTEXT,
    DEFAULT_MODEL,
    Group,
    default_model,
    output_options,
    pass_session,
    print_json,
    tls_flag,
    unescape,
)
from rbee.keeper.session import Session, short_id

__all__ = ["cli", "main", "DEFAULT_MODEL"]

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")


@click.group(cls=Group, context_settings=CONTEXT, invoke_without_command=True)
@click.option(
    "--queen-url",
    metavar="URL",
    help="The queen to talk to. Default: $RBEE_QUEEN_URL, else queen_url in ~/.config/rbee/config.toml, "
    "else http://127.0.0.1:7833.",
)
@click.option(
    "--token",
    metavar="TOKEN",
    help="Bearer token for a queen that requires one. Default: $RBEE_TOKEN, else the config.",
)
@click.option(
    "--queen-fingerprint",
    metavar="SHA256:...",
    expose_value=False,
    callback=tls_flag,
    help="Trust only the https queen whose certificate has this SHA-256 fingerprint (`rbee queen status`"
    " on its machine shows it). Default: $RBEE_QUEEN_FINGERPRINT.",
)
@click.option(
    "--ca-cert",
    metavar="PEM",
    expose_value=False,
    callback=tls_flag,
    help="Verify an https queen against this certificate file, not the system's store. Default: $RBEE_CA_CERT.",
)
@click.option("-q", "--quiet", is_flag=True, help="Hide progress and the summary; show only the output.")
@click.option("-v", "--verbose", is_flag=True, help="Show the servers' narration of every step on stderr.")
@click.option("--json", "json_mode", is_flag=True, help="Print every event as one JSON line on stdout, for scripts.")
@click.version_option(__version__, "-V", "--version", prog_name="rbee")
@click.pass_context
def cli(
    ctx: click.Context, queen_url: str | None, token: str | None, quiet: bool, verbose: bool, json_mode: bool
) -> None:
    """Run LLM inference on the machines you already own, with every step narrated.

    \b
    Examples:
      rbee infer "Why is the sky blue?"
      echo "Write a haiku about bees" | rbee infer -m gemma3-270m --max-tokens 64
      rbee hive start --host 127.0.0.2 --hive-id beta       # a second hive
      rbee model download URL --alias tiny --hive beta       # a model for it
      rbee infer -m tiny --hive beta "Hello"
      rbee status
      rbee jobs list

    The queen is started on this machine when a command needs it and it is not
    running (set RBEE_NO_AUTOSTART=1 to prevent that). Settings come from
    flags, then RBEE_QUEEN_URL / RBEE_TOKEN, then ~/.config/rbee/config.toml
    (see `rbee config`). Shell completion: `rbee completion --help`.
    Output: the result on stdout; on a terminal, `rbee infer` keeps one status
    line on stderr and ends with a one-line summary; -v shows the narration of
    every step, -q only the output, --json every event.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(EXIT_OK)
    session = Session(queen_url=queen_url, token=token, quiet=quiet, json_mode=json_mode, verbose=verbose)
    ctx.obj = session
    ctx.call_on_close(session.close)


# -- infer -------------------------------------------------------------------


@cli.command(context_settings=CONTEXT, short_help="Generate text from a prompt.")
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
@click.option(
    "--keep-alive",
    type=lifecycle.KEEP_ALIVE,
    metavar="DURATION",
    help="Keep the model loaded this long once idle (5m, 1h; -1: for ever; 0: unload after).",
)
@click.option(
    "--chat", "as_chat", is_flag=True, help="Send PROMPT as a user's message through the model's chat template."
)
@click.option(
    "-d", "--detach", is_flag=True, help="Print the job's id and return; the job runs on (see `rbee jobs logs`)."
)
@output_options
@pass_session
def infer(session: Session, /, prompt: str | None, detach: bool, as_chat: bool, **options: Any) -> None:
    """Generate text from PROMPT (read from stdin when omitted or "-").

    Tokens go to stdout as they arrive; on a terminal one status line on
    stderr says where the job is (queued, loading, generating) and a summary
    line ends it; -v shows the narration of each step (which hive and worker
    run it). Ctrl-C cancels the job. Defaults for the sampling flags come from
    [sampling] in the config file. --stop understands \\n, \\t and \\\\.

    \b
    Examples:
      rbee infer "Why is the sky blue?"
      rbee infer -m gemma3-270m --max-tokens 50 --temperature 0 "Count to ten:"
      rbee infer -m tiny --hive beta "Hello"            # on a given hive
      cat notes.txt | rbee infer --stop "###" -
      rbee infer "List three colours:" --stop "\\n\\n"   # stop at an empty line
      rbee infer "List three colours:" --json           # one JSON event per line
      rbee infer --detach "Write a story" && rbee jobs logs --follow JOB_ID
      rbee infer --chat "What is the capital of France?"   # one turn of a chat
    """
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    operation: dict[str, Any] = {"operation": "infer", "model": options.pop("model") or default_model(session)}
    sampling = session.config.sampling if session.config.sampling else {}
    from_config = {k: v for k, v in sampling.items() if k in _SAMPLING_KEYS}
    operation.update(from_config)
    options["stop"] = [unescape(s) for s in options["stop"]] or None
    given = {k: v for k, v in options.items() if v is not None}
    operation.update(given)
    if as_chat:  # one turn of a chat (`rbee chat` holds a conversation)
        operation["messages"] = [{"role": "user", "content": prompt}]
    else:
        operation["prompt"] = prompt
    # A refusal names the flag a field came from, or the config file's entry.
    flags = {k: f"{k} (from [sampling] in the config file)" for k in from_config if k not in given}
    if not detach:
        session.run(operation, summary=True, flags=flags)
        return
    job_id = session.submit(operation, flags=flags)
    if session.json_mode:
        print_json({"job_id": job_id, "detached": True})
    else:
        click.echo(job_id)
        session.renderer.notice(f"Running detached; follow it with: rbee jobs logs --follow {short_id(job_id)}")


# -- cluster -----------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@output_options
@pass_session
def status(session: Session) -> None:
    """Show the hives, workers and queues the queen knows.

    \b
    Examples:
      rbee status
      rbee status --json | jq 'select(.event == "result") | .data.workers'
    """
    session.run({"operation": "status"})


@cli.command("queen-check", context_settings=CONTEXT, short_help="Run the queen's self-check.")
@output_options
@pass_session
def queen_check(session: Session) -> None:
    """Run the queen's self-check: narration from every path of a job.

    Each step it narrates is a line of its output (-v shows the raw narration instead).

    \b
    Example:
      rbee queen-check
    """
    session.renderer.steps = True
    session.run({"operation": "queen_check"})


for _group in (hive, worker, model, queen):
    cli.add_command(_group)


# -- jobs --------------------------------------------------------------------


@cli.group(cls=Group, context_settings=CONTEXT)
def jobs() -> None:
    """The queen's jobs: recent history, details, logs, cancel.

    \b
    Examples:
      rbee jobs list
      rbee jobs logs JOB_ID --follow
      rbee jobs cancel JOB_ID
    """


@jobs.command("list", context_settings=CONTEXT)
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="How many jobs.")
@output_options
@pass_session
def jobs_list(session: Session, limit: int) -> None:
    """List recent jobs, newest first: id, operation, model, prompt, state, age, tokens.

    \b
    Example:
      rbee jobs list -n 50
    """
    rows = session.client.jobs(limit)
    if session.json_mode:
        print_json({"jobs": rows})
        return
    from rbee.keeper.tables import JOB_COLUMNS, job_row, print_rows

    print_rows("jobs", [job_row(j) for j in rows], JOB_COLUMNS, out=sys.stdout, colour=session.renderer.colour_out)


@jobs.command("show", context_settings=CONTEXT)
@click.argument("job_id")
@output_options
@pass_session
def jobs_show(session: Session, job_id: str) -> None:
    """Show a job's state, timings, prompt, output and timeline.

    JOB_ID is the id or its start (at least 4 hex characters, as `rbee jobs list` shows it).

    \b
    Examples:
      rbee jobs show 0b9c81f2
      rbee jobs show --json job-0b9c81f2-...
    """
    job = session.client.job(job_id)
    if session.json_mode:
        print_json(job)
        return
    from rbee.keeper.tables import print_job

    print_job(str(job.get("job_id") or job_id), job, out=sys.stdout, colour=session.renderer.colour_out)


@jobs.command("cancel", context_settings=CONTEXT)
@click.argument("job_id")
@output_options
@pass_session
def jobs_cancel(session: Session, job_id: str) -> None:
    """Cancel a job; for a job that already ended, report how it ended.

    JOB_ID is the id or its start (at least 4 hex characters, as `rbee jobs list` shows it).

    \b
    Example:
      rbee jobs cancel 0b9c81f2
    """
    code, job = session.client.cancel(job_id)
    if session.json_mode:
        print_json(job)
        return
    state = str(job.get("status", "unknown"))
    shown = short_id(str(job.get("job_id") or job_id))
    if code == 409:
        click.echo(f"job {shown} had already finished: {state}")
    elif state in ("cancelled", "completed", "failed", "timed_out"):
        click.echo(f"job {shown} is {state}")
    else:
        click.echo(f"job {shown} is being cancelled (now {state})")


@jobs.command("logs", context_settings=CONTEXT, short_help="Replay a job's events (--follow: to its end).")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep reading until the job ends.")
@output_options
@pass_session
def jobs_logs(session: Session, job_id: str, follow: bool) -> None:
    """Replay a job's events (narration, tokens, results) from its start; exit as the job ended.

    The narration is the output here (stdout, with the tokens and results).
    Without --follow, a job that is still running is shown up to now; with
    --follow, it is shown to its end (and Ctrl-C stops watching, not the job).
    JOB_ID is the id or its start (at least 4 hex characters, as `rbee jobs list` shows it).

    \b
    Examples:
      rbee jobs logs 0b9c81f2
      rbee infer --detach "Write a long story" | xargs rbee jobs logs --follow
      rbee jobs logs --follow --json 0b9c81f2
    """
    job = session.client.job(job_id)  # the full id (a short one is resolved once), and where it is now
    full_id = str(job.get("job_id") or job_id)
    until = None
    if not follow and job.get("status") in ("queued", "running") and isinstance(job.get("events"), int):
        until = job["events"]
    session.renderer.logs = True
    session.follow(full_id, until=until)


# -- the keeper itself ----------------------------------------------------------


@cli.command(context_settings=CONTEXT, short_help="Print a shell completion script.")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options, choices).

    \b
    Examples:
      eval "$(rbee completion bash)"                      # add to ~/.bashrc
      eval "$(rbee completion zsh)"                       # add to ~/.zshrc
      rbee completion fish > ~/.config/fish/completions/rbee.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the choice is one click knows
    click.echo(cls(cli, {}, "rbee", "_RBEE_COMPLETE").source())


@cli.command("config", context_settings=CONTEXT)
@output_options
@pass_session
def config_show(session: Session) -> None:
    """Show the settings in effect and where each comes from.

    The file is ~/.config/rbee/config.toml (or $RBEE_CONFIG):

    \b
      queen_url = "http://127.0.0.1:7833"
      token = "..."
      default_model = "gemma3-270m"
      [sampling]
      temperature = 0.7
      max_tokens = 256

    \b
    Examples:
      rbee config
      RBEE_QUEEN_URL=http://gpu-box:7833 rbee config --json
    """
    from rbee.config import config_path

    config = session.config
    env_url, env_token = os.environ.get("RBEE_QUEEN_URL"), os.environ.get("RBEE_TOKEN")
    url_from = (
        "--queen-url"
        if session.url_flag
        else "RBEE_QUEEN_URL"
        if env_url
        else "config file"
        if config.queen_url
        else "default"
    )
    token_from = (
        "--token" if session.token_flag else "RBEE_TOKEN" if env_token else "config file" if config.token else None
    )
    path = config_path()
    shown: dict[str, Any] = {
        "config_file": f"{path}" + ("" if path.exists() else " (none)"),
        "queen_url": f"{session.url} ({url_from})",
        "token": f"set ({token_from})" if token_from else "none",
        "default_model": f"{config.default_model} (config file)"
        if config.default_model
        else f"{DEFAULT_MODEL} (default)",
        "sampling": ", ".join(f"{k}={v}" for k, v in (config.sampling or {}).items()) or "server defaults",
        "data_directory": os.environ.get("RBEE_HOME") or "~/.local/share/rbee",
    }
    if session.json_mode:
        print_json(
            {
                "config_file": str(path),
                "config_file_exists": path.exists(),
                "queen_url": session.url,
                "queen_url_from": url_from,
                "token_set": token_from is not None,
                "token_from": token_from,
                "default_model": config.default_model or DEFAULT_MODEL,
                "sampling": config.sampling or {},
            }
        )
        return
    from rbee.keeper.tables import print_mapping

    print_mapping(None, shown, out=sys.stdout, colour=session.renderer.colour_out)


# -- the entry point -----------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Run ``rbee``; every outcome becomes an exit code here, never a traceback."""
    try:
        code = cli.main(args=argv, prog_name="rbee", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        # A group without its command (`rbee jobs`): its help, as `--help` prints it.
        click.echo(exc.ctx.get_help() if exc.ctx is not None else cli.get_help(click.Context(cli)))
        code = EXIT_OK
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("rbee: cancelled", err=True)
        code = EXIT_INTERRUPTED
    except click.UsageError as exc:
        # One line, and where to read more, rather than click's usage block.
        where = exc.ctx.command_path if exc.ctx is not None else "rbee"
        click.echo(f"rbee: {one_line(exc.format_message())} (see `{where} --help`)", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
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


cli.add_command(lifecycle.ps)
cli.add_command(lifecycle.stop)
cli.add_command(chat_command)
hive.add_command(join.hive_invite)
hive.add_command(join.hive_join)
hive.add_command(join.hive_remove)
hive.add_command(install.hive_install)
hive.add_command(install.hive_uninstall)
queen.add_command(install.queen_install)
queen.add_command(install.queen_uninstall)


if __name__ == "__main__":
    main()
