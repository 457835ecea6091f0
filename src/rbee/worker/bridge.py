"""The one thread seam: a blocking token iterator, driven from asyncio.

:func:`run_generation` runs ``engine.generate`` in the worker's generation
thread and hands each piece to the event loop through a bounded buffer: the
producer takes a permit from a semaphore before posting a piece and the
consumer gives it back after taking one, so a slow stream slows the engine
instead of growing memory. Every piece reaches the job's stream through
:func:`rbee.jobs.emit_token` (lossless).

Cancellation of the awaiting task (``DELETE``, a client that left with
``cancel_on_disconnect``, the job's deadline) raises the stop flag; the engine
checks it before every token, so generation stops within one token. The
task then waits, shielded and bounded, for the thread to finish before the
cancellation goes on: the next job never races a still-running generation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from rbee.errors import GenerationError
from rbee.jobs.registry import emit_token
from rbee.narration import log
from rbee.worker.engine import Engine, GenerationOutcome, GenerationRequest

__all__ = ["run_generation", "BUFFER_PIECES", "JOIN_TIMEOUT_S"]

#: Pieces the generation thread may run ahead of the event loop.
BUFFER_PIECES = 64
#: How long a cancelled generation may take to notice the stop flag.
JOIN_TIMEOUT_S = 5.0
_SPACE_POLL_S = 0.05

_END = object()


async def run_generation(
    engine: Engine,
    req: GenerationRequest,
    executor: Executor,
    *,
    outcome: GenerationOutcome | None = None,
    on_first_piece: Callable[[], None] | None = None,
    buffer: int = BUFFER_PIECES,
) -> GenerationOutcome:
    """Generate ``req`` on ``engine`` in ``executor``'s thread, streaming pieces to the current job.

    ``outcome`` (filled in place) lets the caller read the token counts even
    when this raises. An engine exception becomes :class:`GenerationError`.
    """
    outcome = outcome if outcome is not None else GenerationOutcome()
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Any] = asyncio.Queue()  # bounded by ``space``, not by maxsize
    space = threading.Semaphore(buffer)
    stop = threading.Event()
    failure: list[BaseException] = []

    def post(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to read

    def wait_for_space() -> bool:
        while not space.acquire(timeout=_SPACE_POLL_S):
            if stop.is_set():
                return False
        return True

    def produce() -> None:
        try:
            for piece in engine.generate(req, stop.is_set, outcome):
                # A piece refused here is dropped: the stop flag is up and the
                # engine sees it before its next token.
                if wait_for_space():
                    post(piece)
        except BaseException as exc:
            failure.append(exc)
            outcome.stop_reason = "error"
        finally:
            post(_END)

    thread_done = loop.run_in_executor(executor, produce)
    first = True
    try:
        while True:
            item = await pieces.get()
            if item is _END:
                break
            space.release()
            await emit_token(item)
            if first:
                first = False
                if on_first_piece is not None:
                    on_first_piece()
    finally:
        stop.set()
        await _join(thread_done)
    if failure:
        exc = failure[0]
        raise GenerationError(f"the engine failed: {type(exc).__name__}: {exc}") from exc
    return outcome


async def _join(thread_done: asyncio.Future[None]) -> None:
    """Wait for the generation thread, even while being cancelled, but not forever."""
    if thread_done.done():
        return
    try:
        await asyncio.wait_for(asyncio.shield(thread_done), JOIN_TIMEOUT_S)
    except TimeoutError:
        # The thread has the stop flag and finishes on its own; a single
        # thread executor keeps the next generation behind it.
        log().error("generation thread did not stop in time", timeout_s=JOIN_TIMEOUT_S)
