"""A download's progress as a bar on the terminal, drawn with rich.

Only byte progress (``unit == "bytes"``: model downloads) on a terminal gets
a bar; the renderer creates one on the first such event, so rich is imported
by the commands that download and never on the ``rbee infer`` path. While the
bar is shown, every other line the keeper prints goes through its console and
appears above it; the bar stays, complete, once its download is over.
"""

from __future__ import annotations

from typing import IO, Any

__all__ = ["ByteBar", "rate_text"]


def rate_text(rate: Any) -> str:
    if not isinstance(rate, int | float) or rate <= 0:
        return ""
    for scale, name in ((1 << 30, "GiB/s"), (1 << 20, "MiB/s"), (1 << 10, "KiB/s")):
        if rate >= scale:
            return f"{rate / scale:.1f} {name}"
    return f"{rate:.0f} B/s"


class ByteBar:
    """One bar per file: ``name ━━━━━━━━━━━━ 120.0/253.0 MiB 80.2 MiB/s 0:00:02``."""

    def __init__(self, err: IO[str], *, colour: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(
            file=err,
            no_color=not colour,
            color_system="auto" if colour else None,
            highlight=False,
            force_terminal=True,
        )
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
            refresh_per_second=8,
        )
        self._task: Any = None
        self.key: tuple[str, str] | None = None
        self.running = False

    def update(self, data: dict[str, Any]) -> None:
        done = data.get("done") or 0
        total = data.get("total")
        label = str(data.get("file") or data.get("model") or data.get("action") or "download")
        key = (str(data.get("action")), label)
        if self._task is None:
            self.key = key
            self._task = self._progress.add_task(label, total=total, rate="")
            self._progress.start()
            self.running = True
        self._progress.update(self._task, completed=done, total=total, rate=rate_text(data.get("rate")))
        # Lines printed above the bar redraw what was last rendered: render now.
        self._progress.refresh()

    def print(self, line: str) -> None:
        """A line above the bar (``line`` may carry the renderer's ANSI styles)."""
        from rich.text import Text

        self.console.print(Text.from_ansi(line), soft_wrap=True)

    def stop(self) -> None:
        if self.running:
            self._progress.stop()
            self.running = False
