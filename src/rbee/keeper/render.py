"""Rendering a job's events for people (or, with ``--json``, for scripts).

Tokens go to stdout as they arrive. Narration (the servers' step-by-step
events) is shown only with ``-v`` (on stderr, dimmed on a terminal), as the
output of ``rbee jobs logs`` (stdout), or as the steps of ``rbee queen-check``;
otherwise ``rbee infer`` keeps one live status line on a terminal's stderr
(queued, loading, generating with its token count) that its one-line summary
replaces at the end, and the other commands print their results only.
Progress is one updating line on a terminal and nothing otherwise, except a
download's bytes, which get a bar (:mod:`rbee.keeper.progress`, rich, imported
on the first such event); results become tables (:mod:`rbee.keeper.tables`,
which imports rich only when a table is drawn). Whatever goes to stderr never
lands inside the generated text when both streams reach the same terminal or
file: the text's line is ended first. Colour appears only on a terminal and
only while ``NO_COLOR`` is unset. Event data never carries presentation;
everything about layout lives here.

This module is on the ``rbee infer`` path: standard library only.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import IO, Any

__all__ = [
    "Renderer",
    "colour_allowed",
    "format_narration",
    "format_summary",
    "format_progress",
    "format_status",
    "same_output",
    "BOOKKEEPING_ACTIONS",
]

DIM = "\x1b[2m"
YELLOW = "\x1b[33m"
RED = "\x1b[31m"
RESET = "\x1b[0m"
CLEAR_LINE = "\r\x1b[2K"

# Escape sequences and control characters other than newline and tab: text
# from a server or a model must not be able to drive the person's terminal.
_TERMINAL_UNSAFE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f\x9b]")
_LINE_UNSAFE = re.compile(r"[\x00-\x1f\x7f\x9b]+")


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def same_output(out: IO[str], err: IO[str]) -> bool:
    """Whether stdout and stderr reach the same place (one terminal, one file, one pipe: ``2>&1``)."""
    if _isatty(out) and _isatty(err):
        return True
    try:
        a, b = os.fstat(out.fileno()), os.fstat(err.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


#: Narration that says only that a job runs, was routed or finished: not a step worth a line of its own.
BOOKKEEPING_ACTIONS = frozenset(
    {"job_start", "route_job", "job_done", "hive_route", "forward_start", "forward_complete"}
)

#: The live status line's text for the narration of an inference's journey.
_STATUS_OF_ACTION = {
    "infer_start": "waiting for a worker",
    "infer_schedule": "finding a worker",
    "infer_spawn": "loading the model",
    "model_resolved": "loading the model",
    "worker_spawn_start": "loading the model",
    "worker_slots": "loading the model",
    "worker_process": "loading the model",
    "worker_ready": "the model is loaded",
    "infer_spawned": "the model is loaded",
    "infer_worker": "starting on a worker",
    "infer_dispatch": "starting on a worker",
}


def format_status(data: dict[str, Any], kind: str) -> str | None:
    """The live status line for a narration or progress event, or None to leave it as it is."""
    if kind == "progress":
        action = data.get("action")
        if action == "queue":
            done, total = data.get("done"), data.get("total")
            where = f" {done:g}" if isinstance(done, int | float) else ""
            of = f" of {total:g}" if isinstance(total, int | float) and total else ""
            eta = data.get("eta_s")
            wait = f", about {eta:.0f} s" if isinstance(eta, int | float) and eta >= 1 else ""
            return f"queued: position{where}{of}{wait}"
        if action == "worker_start":
            return "loading the model"
        return None
    action = str(data.get("action") or "")
    if data.get("level") in ("warn", "error") and action not in BOOKKEEPING_ACTIONS and not action.startswith("job_"):
        return _LINE_UNSAFE.sub(" ", str(data.get("human") or action)).strip()[:200] or None
    if data.get("actor") == "worker" and action == "infer_start":
        return "reading the prompt"
    text = _STATUS_OF_ACTION.get(action)
    if text is None:
        return None
    model = data.get("model")
    if text == "loading the model" and isinstance(model, str) and model:
        text = f"loading {model}"
    hive = data.get("hive_id")
    if isinstance(hive, str) and hive and text.startswith("loading"):
        text += f" on hive {hive}"
    worker = data.get("worker_id")
    if text == "starting on a worker" and isinstance(worker, str) and worker:
        text = f"starting on {worker}"
    return _LINE_UNSAFE.sub(" ", text)


def colour_allowed(stream: IO[str]) -> bool:
    """Colour only on a terminal, and only while ``NO_COLOR`` is unset (https://no-color.org)."""
    return _isatty(stream) and not os.environ.get("NO_COLOR")


def format_narration(data: dict[str, Any], *, colour: bool) -> str:
    """``[actor] human`` on one line; warnings and errors say so."""
    actor = _LINE_UNSAFE.sub(" ", str(data.get("actor") or "rbee"))
    human = _LINE_UNSAFE.sub(" ", str(data.get("human") or data.get("action") or "")).strip()
    level = data.get("level", "info")
    prefix = {"warn": "warning: ", "error": "error: "}.get(level, "")
    line = f"[{actor}] {prefix}{human}"
    if not colour:
        return line
    style = {"warn": YELLOW, "error": RED}.get(level, DIM)
    return f"{style}{line}{RESET}"


def _amount(value: float, unit: str) -> str:
    if unit in ("bytes", "B", "byte"):
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    return f"{value:g}"


def format_progress(data: dict[str, Any], *, width: int = 24) -> str:
    """``model download  12.0 MiB / 250.0 MiB  [#####.......]  5%``."""
    label = _LINE_UNSAFE.sub(" ", str(data.get("action") or "progress")).replace("_", " ")
    unit = str(data.get("unit") or "")
    try:
        done = float(data.get("done") or 0)
        total = float(data["total"]) if data.get("total") is not None else None
    except (TypeError, ValueError):
        return label
    shown_unit = "" if unit in ("bytes", "B", "byte") or not unit else f" {unit}"
    if not total or total <= 0:
        return f"{label}  {_amount(done, unit)}{shown_unit}"
    frac = min(max(done / total, 0.0), 1.0)
    filled = int(frac * width)
    bar = "#" * filled + "." * (width - filled)
    return f"{label}  {_amount(done, unit)} / {_amount(total, unit)}{shown_unit}  [{bar}] {frac * 100:3.0f}%"


def format_summary(end: dict[str, Any], tokens_seen: int) -> str:
    """One line: tokens, tokens/s, time to first token, worker and hive."""
    tokens = end.get("tokens_out")
    if tokens is None:
        tokens = tokens_seen
    parts = [f"{tokens} token{'s' if tokens != 1 else ''}"]
    if isinstance(end.get("tokens_per_s"), int | float):
        parts.append(f"{end['tokens_per_s']:.1f} tokens/s")
    if isinstance(end.get("ttft_ms"), int | float):
        parts.append(f"first token {end['ttft_ms']:.0f} ms")
    if isinstance(end.get("duration_ms"), int | float):
        parts.append(f"total {end['duration_ms'] / 1000:.2f} s")
    where = []
    if end.get("worker_id"):
        where.append(f"worker {end['worker_id']}")
    if end.get("hive_id"):
        where.append(f"hive {end['hive_id']}")
    if where:
        parts.append(" on ".join(where))
    return _LINE_UNSAFE.sub(" ", ", ".join(parts))


class Renderer:
    """Turns one job's events into output; one renderer per command.

    ``verbose`` shows every narration line on stderr (as ``-v``); ``live`` (set
    for ``rbee infer``) keeps one status line on a terminal's stderr instead;
    ``logs`` makes narration part of the output (stdout, ``rbee jobs logs``);
    ``steps`` shows each narrated step on stdout, without the bookkeeping
    (``rbee queen-check``). ``shared`` says whether stdout and stderr reach the
    same terminal or file (found out when not given).
    """

    def __init__(
        self,
        *,
        quiet: bool = False,
        json_mode: bool = False,
        verbose: bool = False,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        shared: bool | None = None,
    ) -> None:
        self.quiet = quiet
        self.json_mode = json_mode
        self.verbose = verbose
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.out_tty = _isatty(self.out)
        self.err_tty = _isatty(self.err)
        self.shared = same_output(self.out, self.err) if shared is None else shared
        self.colour_out = colour_allowed(self.out)
        self.colour_err = colour_allowed(self.err)
        self.live = False
        self.logs = False
        self.steps = False
        #: After Ctrl-C: the job is being cancelled; nothing more of it is shown.
        self.cancelling = False
        self.tokens = 0
        self.end: dict[str, Any] | None = None
        self.status = ""  # what the live status line says (kept even where it is not drawn)
        self._mid_line = False  # stdout holds generated text not yet ended by a newline
        self._progress_shown = False  # a progress or status line is drawn on stderr
        self._progress_at = 0.0
        self._held: list[str] = []  # narration kept back while text streams to the same terminal
        self._held_out: list[str] = []  # the same, for narration shown on stdout (``rbee jobs logs``)
        self._bar: Any = None  # a rich download bar (rbee.keeper.progress.ByteBar) while one is shown

    # -- dispatch ----------------------------------------------------------

    def event(self, event: Any) -> None:
        """Render one :class:`~rbee.keeper.client.Event`."""
        kind = event.kind
        if kind == "end":
            self.end = event.data if isinstance(event.data, dict) else {}
        if self.json_mode:
            if kind == "token":
                self.tokens += 1
            self.out.write(event.json_line() + "\n")
            self.out.flush()
            return
        if kind == "token":
            self.token(event.data)
        elif kind == "narration":
            self.narration(event.data)
        elif kind == "progress":
            self.progress(event.data)
        elif kind == "result":
            self.result(event.data)

    # -- kinds -------------------------------------------------------------

    def token(self, data: dict[str, Any]) -> None:
        text = str(data.get("t", ""))
        self.tokens += 1
        if self.cancelling:
            return
        if self._live_line():
            self.status = f"generating: {self.tokens} token{'s' if self.tokens != 1 else ''}"
            if not self.shared:
                self._draw_status()
        if not text:
            return
        self._stop_bar()
        if self.shared:
            self._clear_progress()
        if self.out_tty:
            text = _TERMINAL_UNSAFE.sub("", text)
        self.out.write(text)
        self.out.flush()
        self._mid_line = not text.endswith("\n")

    def narration(self, data: Any) -> None:
        if self.quiet or self.cancelling or not isinstance(data, dict):
            return
        if self.logs:
            line = format_narration(data, colour=self.colour_out)
            if self._mid_line and self.end is None and data.get("level", "info") in ("info", "debug"):
                self._held_out.append(line)  # the text stays in one piece; what was said meanwhile follows it
            else:
                self.out_line(line)
            return
        if self.verbose:
            self._narration_line(data)
            return
        if self.steps:
            if data.get("action") not in BOOKKEEPING_ACTIONS:
                human = _LINE_UNSAFE.sub(" ", str(data.get("human") or data.get("action") or "")).strip()
                self.out_line(f"  {human}")
            return
        if self.live:
            status = format_status(data, "narration")
            if status is not None and status != self.status:
                self.status = status
                self._draw_status(force=True)

    def _narration_line(self, data: dict[str, Any]) -> None:
        line = format_narration(data, colour=self.colour_err)
        if self.shared and self.tokens and self.end is None and data.get("level", "info") in ("info", "debug"):
            # Keep the generated text in one piece on screen; what the workers
            # say meanwhile is shown after it. Warnings still interrupt.
            self._held.append(line)
            return
        self.err_line(line)

    def progress(self, data: Any) -> None:
        if self.quiet or self.cancelling or not isinstance(data, dict):
            return
        if self._live_line():
            status = format_status(data, "progress")
            if status is not None and status != self.status:
                self.status = status
                self._draw_status(force=True)
            return
        if not self.err_tty:
            return
        if data.get("unit") == "bytes":
            self._bar_progress(data)
            return
        now = time.monotonic()
        finished = data.get("total") is not None and data.get("done") == data.get("total")
        if not finished and now - self._progress_at < 0.1:
            return  # a terminal line redrawn more than ten times a second only costs time
        self._progress_at = now
        self._break_token_line()
        line = format_progress(data)
        if self.colour_err:
            line = f"{DIM}{line}{RESET}"
        self.err.write(CLEAR_LINE + line)
        self.err.flush()
        self._progress_shown = True

    def _live_line(self) -> bool:
        """Whether this command keeps a status line (``rbee infer`` without -v, -q or --json)."""
        return self.live and not self.verbose and not self.quiet and not self.json_mode

    def _draw_status(self, *, force: bool = False) -> None:
        """Redraw the live status line (a terminal's stderr only; never between pieces of text on it)."""
        if not self.err_tty or not self.status or self.cancelling:
            return
        if self._mid_line and self.shared:
            return
        now = time.monotonic()
        if not force and self._progress_shown and now - self._progress_at < 0.1:
            return
        self._progress_at = now
        line = f"{self.status} ..."
        self.err.write(CLEAR_LINE + (f"{DIM}{line}{RESET}" if self.colour_err else line))
        self.err.flush()
        self._progress_shown = True

    def _bar_progress(self, data: dict[str, Any]) -> None:
        key = (str(data.get("action")), str(data.get("file") or data.get("model") or data.get("action") or "download"))
        if self._bar is not None and self._bar.key != key:
            self._stop_bar()
        if self._bar is None:
            from rbee.keeper.progress import ByteBar

            self._clear_progress()
            self._break_token_line()
            self._bar = ByteBar(self.err, colour=self.colour_err)
        self._bar.update(data)

    def close(self) -> None:
        """Leave the terminal as it was (a bar hides the cursor while it runs)."""
        self._stop_bar()
        self._clear_progress()

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def result(self, data: Any) -> None:
        if self.cancelling:
            return
        self._stop_bar()
        self._clear_progress()
        self._end_text_line()
        from rbee.keeper.tables import print_result

        print_result(data, out=self.out, colour=self.colour_out)

    # -- lines -------------------------------------------------------------

    def out_line(self, line: str) -> None:
        """One line of output on stdout, after the generated text's line if one is open."""
        self._clear_progress()
        self._end_text_line()
        self.out.write(line + "\n")
        self.out.flush()

    def err_line(self, line: str) -> None:
        """One line on stderr that must not land in the middle of generated text."""
        if self._bar is not None:
            self._bar.print(line)  # above the download's bar
            return
        self._clear_progress()
        self._break_token_line()
        self.err.write(line + "\n")
        self.err.flush()

    def notice(self, text: str) -> None:
        """Something the keeper itself says (hidden with ``-q``)."""
        if self.quiet:
            return
        line = _LINE_UNSAFE.sub(" ", text)
        self.err_line(f"{DIM}{line}{RESET}" if self.colour_err else line)

    def finish(self, *, summary: bool = False) -> None:
        """Close the output: end the text's line, then (for ``rbee infer``) the one-line summary.

        The summary replaces the live status line on a terminal, and is the only
        line on stderr elsewhere; ``-q`` and ``--json`` leave it out.
        """
        self._stop_bar()
        self._clear_progress()
        if self.json_mode:
            return
        if self._mid_line and (self.out_tty or self.shared):
            self.out.write("\n")
            self.out.flush()
            self._mid_line = False
        held, self._held = self._held, []
        for line in held:
            self.err_line(line)
        held, self._held_out = self._held_out, []
        for line in held:
            self.out_line(line)
        end = self.end
        if summary and end is not None and end.get("status") == "completed" and not self.quiet and not self.cancelling:
            summary_line = format_summary(end, self.tokens)
            self.err_line(f"{DIM}{summary_line}{RESET}" if self.colour_err else summary_line)

    def _clear_progress(self) -> None:
        if self._progress_shown:
            self.err.write(CLEAR_LINE)
            self.err.flush()
            self._progress_shown = False

    def _shared_terminal(self) -> bool:
        return self.out_tty and self.err_tty

    def _break_token_line(self) -> None:
        # Only when both streams reach the same terminal or file; output
        # redirected elsewhere keeps exactly the generated text.
        if self._mid_line and self.shared:
            self.out.write("\n")
            self.out.flush()
            self._mid_line = False

    def _end_text_line(self) -> None:
        # A table or a line on stdout itself starts on a line of its own.
        if self._mid_line:
            self.out.write("\n")
            self.out.flush()
            self._mid_line = False
