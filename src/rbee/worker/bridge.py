"""The one thread seam: an engine's sequence, driven from asyncio.

:func:`run_generation` submits a request to the engine and awaits what the
engine's thread posts for it: a :class:`~rbee.worker.engine.SlotStart`, the
:class:`~rbee.worker.engine.Piece` s (each step's pieces for a sequence arrive in one
``call_soon_threadsafe``), then one :class:`~rbee.worker.engine.Finished`.
Every piece reaches the job's stream through :func:`rbee.jobs.emit_token`
(lossless). The engine never waits for a reader: what a slow stream has not
taken yet is held here, and that is at most ``max_tokens`` pieces.

Cancellation of the awaiting task (``DELETE``, a client that left with
``cancel_on_disconnect``, the job's deadline) cancels the sequence; the engine
drops it before its next step, which frees the slot, and the task waits,
shielded and bounded, for the engine's ``Finished`` before the cancellation
goes on: the slot is free again when the job ends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from rbee.errors import GenerationError
from rbee.jobs.registry import current_job, emit_token
from rbee.narration import log
from rbee.worker.engine import Engine, Finished, GenerationOutcome, GenerationRequest, Piece, SlotStart

__all__ = ["JOIN_TIMEOUT_S", "run_generation"]

#: How long a cancelled sequence may take to leave the engine.
JOIN_TIMEOUT_S = 5.0


class _LoopSink:
    """Hands a step's items from the engine's thread to one asyncio queue."""

    __slots__ = ("_loop", "_queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[list[Any]]) -> None:
        self._loop = loop
        self._queue = q

    def post(self, items: list[Any]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, items)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to read


async def run_generation(
    engine: Engine,
    req: GenerationRequest,
    *,
    outcome: GenerationOutcome | None = None,
    on_start: Callable[[SlotStart], None] | None = None,
    on_first_piece: Callable[[], None] | None = None,
) -> GenerationOutcome:
    """Generate ``req`` on ``engine``, streaming pieces to the current job.

    ``outcome`` (filled in place) lets the caller read the token counts even
    when this raises. An engine failure becomes :class:`GenerationError`.
    """
    outcome = outcome if outcome is not None else GenerationOutcome()
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[list[Any]] = asyncio.Queue()
    try:
        handle = engine.submit(req, outcome, _LoopSink(loop, items))
    except Exception as exc:
        outcome.stop_reason = "error"
        raise GenerationError(f"the engine refused the request: {type(exc).__name__}: {exc}") from exc
    first = True
    finished: Finished | None = None
    try:
        while finished is None:
            for item in await items.get():
                if isinstance(item, Piece):
                    if item.lp is None:
                        await emit_token(item.text, item.ids)
                    else:
                        await _emit_with_logprobs(item)
                    if first:
                        first = False
                        if on_first_piece is not None:
                            on_first_piece()
                elif isinstance(item, Finished):
                    finished = item
                elif isinstance(item, SlotStart) and on_start is not None:
                    on_start(item)
    finally:
        if finished is None:
            handle.cancel()
            await _drain(items)
    failure = finished.error
    if failure is not None:
        raise GenerationError(f"the engine failed: {type(failure).__name__}: {failure}") from failure
    return outcome


async def _emit_with_logprobs(piece: Piece) -> None:
    """A token event with ``lp``: the log-probabilities of the tokens behind ``ids``."""
    job = current_job()
    data = {"t": piece.text, "i": job.tokens, "ids": list(piece.ids), "lp": list(piece.lp or ())}
    await job.add_token_raw(piece.text, json.dumps(data, ensure_ascii=False, separators=(",", ":")))


async def _drain(items: asyncio.Queue[list[Any]]) -> None:
    """Wait (even while being cancelled, but not forever) until the engine has let the sequence go."""

    async def finished() -> None:
        while not any(isinstance(item, Finished) for item in await items.get()):
            pass

    waiter = asyncio.get_running_loop().create_task(finished(), name="worker:drain")
    try:
        await asyncio.wait_for(asyncio.shield(waiter), JOIN_TIMEOUT_S)
    except TimeoutError:
        log().error("the engine did not let a cancelled sequence go in time", timeout_s=JOIN_TIMEOUT_S)
    except asyncio.CancelledError:
        # Cancelled again while draining: give the engine its bounded time, then go on cancelling.
        try:
            await asyncio.wait_for(waiter, JOIN_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError):
            pass
        raise
