"""``rbee chat``: a conversation with a model on the terminal.

Each turn is an ``infer`` job with the whole conversation as ``messages``; the
worker renders it with the model's chat template (its own, else its family's:
see :mod:`rbee.chat_templates`), and the answer streams to stdout as it comes.

On a terminal: line editing and history (``readline``; the history is kept in
``$RBEE_HOME/chat_history``), a status line on stderr until the first token
(queued, loading the model, thinking), multi-line input between ``\"\"\"`` lines,
``/clear`` to start over (the system prompt stays), ``/bye`` or Ctrl-D to leave.
Ctrl-C during an answer cancels that job and keeps the session (what was shown
of the answer stays in the conversation); Ctrl-C at the prompt clears the line.

Not on a terminal (``echo hi | rbee chat``), stdin is one user message: one
exchange, then the exit code of its job, as ``rbee infer``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click

from rbee.keeper.errors import KeeperError, one_line
from rbee.keeper.options import CONTEXT, default_model, pass_session, unescape
from rbee.keeper.session import Session

__all__ = ["chat", "run_turn"]

_MULTILINE = '"""'
_HELP = (
    'Type a message and press Enter. """ on a line of its own starts and ends a message of several lines.\n'
    "/clear starts the conversation over, /bye (or Ctrl-D) leaves, /help shows this. Ctrl-C stops an answer."
)


class _Status:
    """One line on stderr, on a terminal only, until the answer's first token."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.on = stream.isatty() and not os.environ.get("TERM", "").startswith("dumb")
        self.shown = False

    def say(self, text: str) -> None:
        if self.on:
            self.stream.write(f"\r\x1b[2K\x1b[2m{text}\x1b[0m")
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False


def _status_of(kind: str, data: Any) -> str | None:
    if kind == "progress" and isinstance(data, dict) and data.get("action") == "queue":
        return f"waiting in the queue (position {data.get('done')})"
    if kind == "narration" and isinstance(data, dict):
        action = data.get("action")
        if action in ("infer_spawn", "infer_spawn_wait"):
            return "loading the model..."
        if action in ("infer_worker", "infer_dispatch", "infer_start"):
            return "thinking..."
    return None


def run_turn(session: Session, operation: dict[str, Any], out: TextIO, err: TextIO) -> tuple[str, dict[str, Any]]:
    """Run one answer: stream its text to ``out``; returns the text and the job's ``end``.

    Ctrl-C cancels the job and returns what was shown (``end`` then says ``cancelled``).
    """
    job_id = session.submit(operation, flags={"max_tokens": "--max-tokens"})
    status = _Status(err)
    status.say("thinking...")
    text: list[str] = []
    end: dict[str, Any] = {}
    stream = session.client.events(job_id, cancel_on_disconnect=True)
    try:
        for event in stream:
            if event.kind == "token":
                if not text:
                    status.clear()
                piece = str(event.data.get("t", ""))
                text.append(piece)
                out.write(piece)
                out.flush()
            elif event.kind == "end":
                end = event.data
            elif not text:
                said = _status_of(event.kind, event.data)
                if said:
                    status.say(said)
    except KeyboardInterrupt:
        stream.close()
        status.clear()
        with contextlib.suppress(KeeperError):
            session.client.cancel(job_id, timeout_s=2.0)
        end = {"status": "cancelled", "error": {"kind": "cancelled", "message": "stopped"}, "interrupted": True}
    finally:
        stream.close()
        status.clear()
    return "".join(text), end


def _history_file() -> Path:
    home = os.environ.get("RBEE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share", "rbee")
    return Path(home) / "chat_history"


@contextlib.contextmanager
def _line_editing() -> Iterator[None]:
    """readline's editing and a persistent history for ``input()``, where readline exists."""
    try:
        import readline
    except ImportError:  # pragma: no cover - not on this platform
        yield
        return
    path = _history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def _read_message(prompt: str) -> str | None:
    """One message from the terminal; None at end of input. A \"\"\" line opens several lines."""
    line = input(prompt)
    if line.strip() != _MULTILINE:
        return line
    lines: list[str] = []
    while True:
        more = input("... ")
        if more.strip() == _MULTILINE:
            return "\n".join(lines)
        lines.append(more)


def _interactive(session: Session, base: dict[str, Any], system: list[dict[str, str]]) -> None:
    out, err = sys.stdout, sys.stderr
    messages: list[dict[str, str]] = list(system)
    err.write(f"Chatting with {base['model']}. /help for help, /bye to leave.\n")
    with _line_editing():
        while True:
            try:
                text = _read_message(">>> ")
            except EOFError:
                err.write("\n")
                return
            except KeyboardInterrupt:
                err.write("\n")  # Ctrl-C at the prompt: a fresh line, the session goes on
                continue
            if text is None or not text.strip():
                continue
            command = text.strip()
            if command in ("/bye", "/exit", "/quit"):
                return
            if command == "/clear":
                messages = list(system)
                err.write("(the conversation starts over)\n")
                continue
            if command in ("/help", "/?"):
                err.write(_HELP + "\n")
                continue
            if command.startswith("/"):
                err.write(f"unknown command {command.split()[0]}; /help lists them\n")
                continue
            messages.append({"role": "user", "content": text})
            try:
                answer, end = run_turn(session, {**base, "messages": messages}, out, err)
            except KeeperError as exc:
                messages.pop()
                err.write(f"rbee: {one_line(exc.message)}\n")
                continue
            if answer and not answer.endswith("\n"):
                out.write("\n")
            out.flush()
            status = end.get("status")
            if status == "completed" or (status == "cancelled" and answer):
                messages.append({"role": "assistant", "content": answer})
            else:
                messages.pop()
            if status == "cancelled":
                err.write("(stopped)\n")
            elif status != "completed":
                error = end.get("error") or {}
                err.write(f"rbee: {one_line(str(error.get('message') or status))}\n")


def chat_operation(session: Session, model: str | None, **options: Any) -> dict[str, Any]:
    """The ``infer`` fields every turn shares (model, sampling, placement)."""
    operation: dict[str, Any] = {"operation": "infer", "model": model or default_model(session)}
    sampling = session.config.sampling if session.config.sampling else {}
    operation.update({k: v for k, v in sampling.items() if k in ("max_tokens", "temperature", "top_p", "top_k")})
    operation.update({k: v for k, v in options.items() if v is not None})
    return operation


@click.command(context_settings=CONTEXT, short_help="Chat with a model on the terminal.")
@click.option("-m", "--model", help="Model id or alias. Default: default_model in the config, else gemma3-270m.")
@click.option("--system", metavar="TEXT", help="A system prompt that opens the conversation.")
@click.option("--max-tokens", type=int, help="Most tokens in one answer.")
@click.option("--temperature", type=float, help="Sampling temperature, 0 to 2.")
@click.option("--seed", type=int, help="Random seed, for repeatable answers.")
@click.option("--hive", "hive_id", metavar="HIVE_ID", help="Run on this hive.")
@pass_session
def chat(session: Session, /, model: str | None, system: str | None, **options: Any) -> None:
    """Talk with MODEL: each message you type gets an answer, with the conversation so far.

    The model's chat template turns the conversation into its prompt (the
    GGUF's own, else its family's turn format; `rbee model get` shows which).
    Type \"\"\" on a line to write several lines; /clear starts over; /bye or
    Ctrl-D leaves; Ctrl-C stops an answer and keeps the conversation. With stdin
    not a terminal, it is one message and one answer.

    \b
    Examples:
      rbee chat
      rbee chat -m gemma3-270m --system "You answer in one sentence."
      echo "Name three colours." | rbee chat --temperature 0
    """
    base = chat_operation(session, model, **options)
    opening = [{"role": "system", "content": unescape(system)}] if system else []
    if sys.stdin.isatty():
        _interactive(session, base, opening)
        return
    text = sys.stdin.read()
    if not text.strip():
        raise click.UsageError("stdin is empty: give a message")
    answer, end = run_turn(
        session, {**base, "messages": [*opening, {"role": "user", "content": text}]}, sys.stdout, sys.stderr
    )
    if answer and not answer.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if end.get("interrupted"):
        raise KeyboardInterrupt
    session.outcome(end)
