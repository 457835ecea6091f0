"""Rendering a job's events for people (or, with ``--json``, for scripts).

Tokens go to stdout as they arrive; narration goes to stderr, dimmed on a
terminal and hidden with ``-q``; progress is one updating line on a terminal
and nothing otherwise, except a download's bytes, which get a bar
(:mod:`rbee.keeper.progress`, rich, imported on the first such event);
results become tables (:mod:`rbee.keeper.tables`, which imports rich only when
a table is drawn). Colour appears only on a terminal
and only while ``NO_COLOR`` is unset. Event data never carries presentation;
everything about layout lives here.

This module is on the ``rbee infer`` path: standard library only.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import IO, Any

__all__ = ["Renderer", "colour_allowed", "format_narration", "format_summary", "format_progress"]

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
    """Turns one job's events into output; one renderer per command."""

    def __init__(
        self,
        *,
        quiet: bool = False,
        json_mode: bool = False,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
    ) -> None:
        self.quiet = quiet
        self.json_mode = json_mode
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.out_tty = _isatty(self.out)
        self.err_tty = _isatty(self.err)
        self.colour_out = colour_allowed(self.out)
        self.colour_err = colour_allowed(self.err)
        self.tokens = 0
        self.end: dict[str, Any] | None = None
        self._mid_line = False  # stdout holds generated text not yet ended by a newline
        self._progress_shown = False
        self._progress_at = 0.0
        self._held: list[str] = []  # narration kept back while text streams to the same terminal
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
        if not text:
            return
        self._stop_bar()
        self._clear_progress()
        if self.out_tty:
            text = _TERMINAL_UNSAFE.sub("", text)
        self.out.write(text)
        self.out.flush()
        self._mid_line = not text.endswith("\n")

    def narration(self, data: Any) -> None:
        if self.quiet or not isinstance(data, dict):
            return
        line = format_narration(data, colour=self.colour_err)
        if (
            self._shared_terminal()
            and self.tokens
            and self.end is None
            and data.get("level", "info") in ("info", "debug")
        ):
            # Keep the generated text in one piece on screen; what the workers
            # say meanwhile is shown after it. Warnings still interrupt.
            self._held.append(line)
            return
        self.err_line(line)

    def progress(self, data: Any) -> None:
        if self.quiet or not self.err_tty or not isinstance(data, dict):
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

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def result(self, data: Any) -> None:
        self._stop_bar()
        self._clear_progress()
        self._break_token_line()
        from rbee.keeper.tables import print_result

        print_result(data, out=self.out, colour=self.colour_out)

    # -- lines -------------------------------------------------------------

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
        """Close the output: end the token line and, on a terminal, print the summary."""
        self._stop_bar()
        self._clear_progress()
        if self.json_mode:
            return
        if self._mid_line and self.out_tty:
            self.out.write("\n")
            self.out.flush()
            self._mid_line = False
        held, self._held = self._held, []
        for line in held:
            self.err_line(line)
        end = self.end
        if summary and end is not None and end.get("status") == "completed" and self.err_tty and not self.quiet:
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
        # Only when both streams share the person's terminal; redirected output
        # keeps exactly the generated text.
        if self._mid_line and self._shared_terminal():
            self.out.write("\n")
            self.out.flush()
            self._mid_line = False
