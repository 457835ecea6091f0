"""The thread bridge on its own: lossless under a slow reader, bounded run-ahead,
typed failures, and a cancelled generation that has stopped before it returns."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from rbee.contracts.operations import Infer, OperationBase
from rbee.jobs.job import TOKEN_WINDOW, Job
from rbee.jobs.registry import JobRegistry
from rbee.worker.bridge import BUFFER_PIECES, run_generation
from rbee.worker.engine import FakeEngine, GenerationOutcome, GenerationRequest

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def gen_thread() -> AsyncIterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-gen")
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


def _submit(registry: JobRegistry, engine: FakeEngine, executor: ThreadPoolExecutor, outcome: GenerationOutcome) -> Job:
    async def execute(op: OperationBase) -> None:
        await run_generation(engine, GenerationRequest(prompt="p", max_tokens=100_000), executor, outcome=outcome)

    return registry.submit(Infer(prompt="p"), execute)


async def _until_stable(read: Callable[[], int], quiet_s: float = 0.2) -> int:
    last = -1
    async with asyncio.timeout(10):
        while True:
            value = read()
            if value == last:
                return value
            last = value
            await asyncio.sleep(quiet_s)


async def test_a_stalled_reader_holds_the_engine_back_and_loses_nothing(gen_thread: ThreadPoolExecutor) -> None:
    engine = FakeEngine(tokens=5_000)
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, engine, gen_thread, outcome)
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
        ahead = await _until_stable(lambda: engine.generated)
        # Held back by the job's token window plus the bridge's buffer.
        assert ahead < 5_000
        assert ahead <= 10 + TOKEN_WINDOW + BUFFER_PIECES + 8
        release.set()
        async with asyncio.timeout(10):
            await reader
    finally:
        reader.cancel()
        await registry.aclose()
    assert texts == [f"tok{i} " for i in range(5_000)]
    assert job.status.value == "completed"
    assert (outcome.tokens_out, outcome.stop_reason) == (5_000, "eos")


async def test_an_engine_exception_fails_the_job_with_generation_error(gen_thread: ThreadPoolExecutor) -> None:
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, FakeEngine(tokens=10, fail_after=4), gen_thread, outcome)
    await asyncio.wait_for(registry.wait(job), 10)
    assert job.status.value == "failed"
    assert job.error is not None and job.error["kind"] == "generation_error"
    assert job.tokens == outcome.tokens_out == 4
    assert outcome.stop_reason == "error"


async def test_a_cancelled_generation_has_stopped_when_the_job_ends(gen_thread: ThreadPoolExecutor) -> None:
    engine = FakeEngine(tokens=100_000, delay_ms=10)
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, engine, gen_thread, outcome)
    async with asyncio.timeout(10):
        while True:
            if job.tokens >= 3:
                break
            await asyncio.sleep(0.005)
    registry.cancel(job.id)
    await asyncio.wait_for(registry.wait(job), 10)
    assert job.status.value == "cancelled"
    # The thread is free at once: nothing of the cancelled generation is left in it.
    assert await asyncio.wait_for(asyncio.wrap_future(gen_thread.submit(lambda: engine.generated)), 1) == (
        engine.generated
    )
    assert outcome.stop_reason == "cancelled"
    assert outcome.tokens_out == engine.generated <= job.tokens + 2


async def test_pieces_arrive_in_order_from_a_generator_engine(gen_thread: ThreadPoolExecutor) -> None:
    class Counting(FakeEngine):
        def generate(self, req, should_stop, outcome) -> Iterator[str]:  # type: ignore[no-untyped-def]
            for i in range(1_000):
                if should_stop():
                    return
                outcome.tokens_out += 1
                yield f"{i},"
            outcome.stop_reason = "eos"

    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    job = _submit(registry, Counting(), gen_thread, outcome)
    await asyncio.wait_for(registry.wait(job), 10)
    assert "".join(job.text) == "".join(f"{i}," for i in range(1_000))
    assert outcome.stop_reason == "eos"
