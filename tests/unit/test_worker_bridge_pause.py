"""After its first piece, an engine that takes every core steps aside once; nothing is lost or reordered."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from rbee.contracts.operations import Infer, OperationBase
from rbee.jobs.registry import JobRegistry
from rbee.worker.bridge import FIRST_PIECE_PAUSE_S, first_piece_pause_s, run_generation
from rbee.worker.engine import FakeEngine, GenerationOutcome, GenerationRequest

pytestmark = pytest.mark.timeout(30)

CORES = os.cpu_count() or 1


@dataclass
class Threads:
    n_threads: int | None
    device: str = "cpu"


class EveryCoreEngine(FakeEngine):
    """The fake engine, claiming llama.cpp's threads on every core."""

    n_threads = CORES
    device = "cpu"


@pytest.mark.parametrize(
    ("engine", "pause"),
    [
        (Threads(CORES), FIRST_PIECE_PAUSE_S),
        (Threads(CORES + 4), FIRST_PIECE_PAUSE_S),
        (Threads(CORES - 1), 0.0 if CORES > 1 else FIRST_PIECE_PAUSE_S),
        (Threads(CORES, device="cuda:0"), 0.0),
        (Threads(None), 0.0),
        (FakeEngine(), 0.0),
    ],
)
def test_only_an_engine_on_every_cpu_core_pauses(engine: object, pause: float) -> None:
    assert first_piece_pause_s(engine) == pause  # type: ignore[arg-type]


@pytest.fixture
async def gen_thread() -> AsyncIterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-gen")
    yield executor
    executor.shutdown(wait=True, cancel_futures=True)


async def test_every_piece_arrives_in_order_across_the_pause(gen_thread: ThreadPoolExecutor) -> None:
    engine = EveryCoreEngine(tokens=200)
    assert first_piece_pause_s(engine) > 0
    registry = JobRegistry(actor="worker")
    outcome = GenerationOutcome()
    firsts: list[int] = []

    async def execute(op: OperationBase) -> None:
        await run_generation(
            engine,
            GenerationRequest(prompt="p", max_tokens=1000),
            gen_thread,
            outcome=outcome,
            on_first_piece=lambda: firsts.append(1),
        )

    job = registry.submit(Infer(prompt="p"), execute)
    texts = [json.loads(data)["t"] async for _, kind, data in job.stream() if kind == "token"]
    assert texts == [f"tok{i} " for i in range(200)]
    assert firsts == [1]
    assert outcome.tokens_out == 200
