"""The two halves of a transfer: the ``.part`` file being written, and its ``progress`` events.

:class:`PartFile` appends in a thread (one write and one hash update per
MiB), so a 4 GB download neither blocks the event loop nor needs a second
pass to hash. :class:`Progress` emits ``progress`` events (bytes done, total,
rate over the last seconds) at most four times a second, and less often once
a download has sent hundreds, so a long download never crowds the job's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from pathlib import Path
from typing import Any

from rbee.jobs.registry import emit_progress

__all__ = ["PartFile", "Progress", "human_bytes", "WRITE_CHUNK"]

#: Bytes gathered before one write (and hash) in a thread.
WRITE_CHUNK = 1 << 20
PROGRESS_INTERVAL_S = 0.25
#: Past this many progress events, one every few seconds: the job's log stays small.
PROGRESS_EVENTS_FAST = 600
PROGRESS_INTERVAL_SLOW_S = 2.0
RATE_WINDOW_S = 3.0


def human_bytes(value: float) -> str:
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {name}"
    return f"{value:.0f} B"


# -- progress ------------------------------------------------------------------


class Progress:
    """Throttled ``progress`` events with a transfer rate over the last seconds."""

    def __init__(self, *, model: str, file: str, action: str = "model_download") -> None:
        self.model = model
        self.file = file
        self.action = action
        self.sent = 0
        self._last = float("-inf")
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, now: float, done: int) -> float:
        samples = self._samples
        samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW_S:
            samples.popleft()
        t0, d0 = samples[0]
        return (done - d0) / (now - t0) if now > t0 else 0.0

    def reset(self) -> None:
        self._samples.clear()

    def __call__(self, done: int, total: int | None, *, final: bool = False) -> None:
        now = time.monotonic()
        rate = self.rate(now, done)
        interval = PROGRESS_INTERVAL_S if self.sent < PROGRESS_EVENTS_FAST else PROGRESS_INTERVAL_SLOW_S
        if not final and now - self._last < interval:
            return
        self._last = now
        self.sent += 1
        emit_progress(self.action, done, total, "bytes", rate=round(rate), file=self.file, model=self.model)


# -- the file being written ----------------------------------------------------


class PartFile:
    """The ``.part`` file: appended in threads, hashed as written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.hasher = hashlib.sha256()
        self._buf = bytearray()
        self._fh: Any = None

    async def open(self, *, resume: bool) -> None:
        """Open for appending; with ``resume``, keep (and hash) what is already there."""
        self.close()
        self.hasher = hashlib.sha256()
        self._buf.clear()
        self.size = 0
        if resume and await asyncio.to_thread(self.path.exists):
            self._fh = await asyncio.to_thread(open, self.path, "r+b")
            self.size = await self._hash_existing()
        else:
            self._fh = await asyncio.to_thread(open, self.path, "wb")

    async def _hash_existing(self) -> int:
        size = 0
        while True:
            block = await asyncio.to_thread(self._fh.read, 8 * WRITE_CHUNK)
            if not block:
                return size
            self.hasher.update(block)
            size += len(block)

    async def restart(self) -> None:
        """Throw away what was written: the server sends the file from the start."""
        self._buf.clear()
        await asyncio.to_thread(self._truncate)
        self.hasher = hashlib.sha256()
        self.size = 0

    def _truncate(self) -> None:
        self._fh.seek(0)
        self._fh.truncate()

    async def write(self, data: bytes) -> None:
        self._buf += data
        self.size += len(data)
        if len(self._buf) >= WRITE_CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if not self._buf:
            return
        data = bytes(self._buf)
        self._buf.clear()
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self.hasher.update(data)

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
