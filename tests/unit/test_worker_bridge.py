"""The engine bridge on its own: lossless under a slow reader without holding the engine back,
typed failures, and a cancelled sequence that has left the engine before the job ends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from rbee.contracts.operations import Infer, OperationBase
from rbee.errors import GenerationError
from rbee.jobs.job import Job
from rbee.jobs.registry import JobRegistry
from rbee.worker.bridge import run_generation
from rbee.worker.engine import Finished, GenerationOutcome, GenerationRequest, Piece, SlotStart
from rbee.worker.fake import FakeEngine

pytestmark = pytest.mark.timeout(30)


def _submit(registry: JobRegistry, engine: Any, outcome: GenerationOutcome, **kwargs: Any) -> Job:
    async def execute(op: OperationBase) -> None:
        await run_generation(engine, GenerationRequest(prompt="p", max_tokens=100_000), outcome=outcome, **kwargs)

    return registry.submit(Infer(prompt="p"), execute)


async def test_a_stalled_reader_loses_nothing_and_does_not_hold_the_engine() -> None:
    engine = FakeEngine(tokens=5_000, slots=4)
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, engine, outcome)
    release = asyncio.Event()
    texts: list[str] = []

    async def read() -> None:
        async for _, kind, data in job.stream():
            if kind == "token":
                texts.append(json.loads(data)["t"])
                if len(texts) == 10:
                    await release.wait()

    reader = asyncio.create_task(read(), name="slow-reader")
    try:
        async with asyncio.timeout(10):
            while engine.generated < 5_000:  # the engine ran on: other slots never wait for this reader  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert len(texts) == 10
        release.set()
        async with asyncio.timeout(10):
            await reader
    finally:
        reader.cancel()
        await registry.aclose()
    assert texts == [f"tok{i} " for i in range(5_000)]
    assert job.status.value == "completed"
    assert (outcome.tokens_out, outcome.stop_reason) == (5_000, "eos")


async def test_an_engine_exception_fails_the_job_with_generation_error() -> None:
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, FakeEngine(tokens=10, fail_after=4), outcome)
    await asyncio.wait_for(registry.wait(job), 10)
    assert job.status.value == "failed"
    assert job.error is not None and job.error["kind"] == "generation_error"
    assert job.tokens == outcome.tokens_out == 4
    assert outcome.stop_reason == "error"


async def test_an_engine_that_refuses_the_request_fails_it_with_generation_error() -> None:
    engine = FakeEngine(slots=0)
    with pytest.raises(GenerationError, match="refused"):
        await run_generation(engine, GenerationRequest(prompt="p"))


async def test_a_cancelled_sequence_has_left_the_engine_when_the_job_ends() -> None:
    engine = FakeEngine(tokens=100_000, delay_ms=10, slots=1)
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, engine, outcome)
    async with asyncio.timeout(10):
        while job.tokens < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    registry.cancel(job.id)
    await asyncio.wait_for(registry.wait(job), 10)
    assert job.status.value == "cancelled"
    assert engine.running == 0  # its slot is free again
    generated = engine.generated
    await asyncio.sleep(0.1)
    assert engine.generated == generated
    assert outcome.stop_reason == "cancelled"
    assert outcome.tokens_out == engine.generated <= job.tokens + 2


async def test_items_of_one_step_arrive_in_order_and_the_slot_start_is_reported() -> None:
    class Batched(FakeEngine):
        """Posts many pieces per call, as the batching engine does with one step's items."""

        def submit(self, req: GenerationRequest, outcome: GenerationOutcome, sink: Any) -> Any:
            outcome.tokens_out = 1_000
            outcome.stop_reason = "eos"
            for start in range(0, 1_000, 7):
                items: list[Any] = [SlotStart(3, 2, 5)] if start == 0 else []
                sink.post([*items, *(Piece(f"{i},", (i,)) for i in range(start, min(start + 7, 1_000)))])
            sink.post([Finished()])
            return self

        def cancel(self) -> None:
            pass

    starts: list[SlotStart] = []
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, Batched(), outcome, on_start=starts.append)
    await asyncio.wait_for(registry.wait(job), 10)
    assert "".join(job.text) == "".join(f"{i}," for i in range(1_000))
    frames = [json.loads(data) for _, kind, data in job.events if kind == "token"]
    assert [(f["i"], f["ids"]) for f in frames] == [(i, [i]) for i in range(1_000)]
    assert starts == [SlotStart(3, 2, 5)]
    assert outcome.stop_reason == "eos"
