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
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from rbee.errors import GenerationError
from rbee.jobs.registry import emit_token
from rbee.narration import log
from rbee.worker.engine import Engine, GenerationOutcome, GenerationRequest

__all__ = ["run_generation", "first_piece_pause_s", "BUFFER_PIECES", "JOIN_TIMEOUT_S", "FIRST_PIECE_PAUSE_S"]

#: Pieces the generation thread may run ahead of the event loop.
BUFFER_PIECES = 64
#: How long a cancelled generation may take to notice the stop flag.
JOIN_TIMEOUT_S = 5.0
_SPACE_POLL_S = 0.05
#: How long, after the first piece, the generation thread steps aside (see :func:`first_piece_pause_s`).
FIRST_PIECE_PAUSE_S = 0.0015
#: The longest it waits for the event loop to have written the first piece.
FIRST_HANDOFF_S = 0.005


def first_piece_pause_s(engine: Engine) -> float:
    """The pause after the first piece for an engine whose threads take every core, else 0.

    The first piece still has three processes to cross (this worker's event
    loop, the queen, the client), each woken in turn. While llama.cpp's
    threads hold every core, each of those wakeups waits for a scheduler
    slice (a few ms on two cores), so the first token reached the client
    about 5 ms after the worker had it. The generation thread therefore waits
    until the loop has written the piece, then steps aside for
    :data:`FIRST_PIECE_PAUSE_S`, leaving a core free while the token travels.
    Once per job: later pieces are pipelined behind the decode, and 1.5 ms in
    the second token's interval is lost in the rate (0.2 % of 64 tokens).
    """
    threads = getattr(engine, "n_threads", None)
    if not isinstance(threads, int) or getattr(engine, "device", "cpu") != "cpu":
        return 0.0
    return FIRST_PIECE_PAUSE_S if threads >= (os.cpu_count() or 1) else 0.0


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
    taken = threading.Event()  # the first piece has been written to the job's stream

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

    pause_s = first_piece_pause_s(engine)

    def produce() -> None:
        try:
            handed = pause_s == 0
            for piece in engine.generate(req, stop.is_set, outcome):
                # A piece refused here is dropped: the stop flag is up and the
                # engine sees it before its next token.
                if wait_for_space():
                    post(piece)
                    if not handed:
                        handed = True
                        taken.wait(FIRST_HANDOFF_S)
                        time.sleep(pause_s)
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
                loop.call_soon(taken.set)  # after the stream has written the token
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
